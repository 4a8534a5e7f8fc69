"""Native CPU kernels, built on first use with the machine's C compiler and loaded by ctypes.

``gn_act.c`` holds the passes of the fused GroupNorm/SiLU/dropout node
(:mod:`difflab.networks.fused_native`). It is plain C with OpenMP, with no PyTorch headers,
so it builds in about a second. It is compiled once per machine with ``-O3 -march=native``
into a cache folder and reused after that. Nothing is downloaded.

When no compiler is found, the build fails, the system is not Linux, or the library would
bring its own OpenMP runtime instead of sharing PyTorch's, :func:`library` returns ``None``.
The U-Net then uses the PyTorch-ops version of the node. It computes the same function;
only dropout masks come from a different generator.

Environment:

* ``DIFFLAB_NATIVE=0`` turns the kernels off.
* ``DIFFLAB_NATIVE_CACHE`` sets the build folder. The default is
  ``$XDG_CACHE_HOME/difflab/native``, or ``~/.cache/difflab/native``. If that folder
  cannot be created, a folder under the system's temporary directory is used.
* ``CC`` names the compiler. The default is ``cc``, then ``gcc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["active", "build", "disabled", "library"]

SOURCE = Path(__file__).with_name("gn_act.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_U32, _F32, _F64 = ctypes.c_uint32, ctypes.c_float, ctypes.c_double
#: ctypes signatures of the entry points in gn_act.c (all return int: 0 or -1)
SIGNATURES = {
    "gn_act_forward": [_P, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64, _INT,
                       _I64, _F64, _INT, _INT, _U32, _U32, _F32, _I64, _P, _P, _INT],
    "gn_act_backward": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _I64,
                        _INT, _INT, _U32, _U32, _F32, _I64, _P, _P, _P, _P, _P, _INT],
    "gn_dropout_mask": [_P, _I64, _U32, _U32, _F32, _INT],
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": CDLL | None once tried; "off": disabled() depth


def _cache_dir() -> Path:
    if os.environ.get("DIFFLAB_NATIVE_CACHE"):
        return Path(os.environ["DIFFLAB_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "difflab" / "native"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    """The CPU's feature list: ``-march=native`` output differs between CPUs."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    found = re.search(r"^(flags|Features)\s*:(.*)$", text, re.M)
    return found.group(2).strip() if found else ""


def _build_key(cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    parts = [SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_flags(),
             platform.machine()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(out_dir: Path | None = None) -> Path:
    """Compile ``gn_act.c`` (if its cached build is missing) and return the library's path.

    The build is written to a temporary name, then renamed, so concurrent processes never
    load a half-written file. Raises ``RuntimeError`` naming the compiler's error.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    folder = Path(out_dir) if out_dir is not None else _cache_dir()
    target = folder / f"gn_act-{_build_key(cc)}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        if out_dir is not None:
            raise
        # e.g. a read-only home: a per-user folder under the temporary directory
        folder = Path(tempfile.gettempdir()) / f"difflab-native-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / target.name
        if target.exists():
            return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _openmp_runtimes() -> set[str]:
    maps = Path("/proc/self/maps").read_text()
    return set(re.findall(r"\S*lib(?:gomp|iomp5|omp)\S*\.so\S*", maps))


def _load() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        raise RuntimeError("native kernels are built for Linux only")
    if "OpenMP" not in torch.__config__.parallel_info():
        raise RuntimeError("PyTorch was not built with OpenMP")
    path = build()
    before = _openmp_runtimes()
    lib = ctypes.CDLL(str(path))
    if _openmp_runtimes() - before:  # a second OpenMP runtime would fight PyTorch's
        raise RuntimeError(f"{path.name} loaded its own OpenMP runtime, not PyTorch's")
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first call; ``None`` if unavailable (warned
    once, with the reason) or turned off by ``DIFFLAB_NATIVE=0``."""
    if os.environ.get("DIFFLAB_NATIVE", "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                warnings.warn(f"difflab: native CPU kernels unavailable, using PyTorch ops "
                              f"({err})", RuntimeWarning, stacklevel=2)
                _state["lib"] = None
    return _state["lib"]  # type: ignore[return-value]


def active() -> ctypes.CDLL | None:
    """:func:`library`, unless inside :func:`disabled`."""
    return None if _state.get("off", 0) else library()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block the fused nodes use PyTorch ops (for tests and ablations)."""
    with _lock:
        _state["off"] = int(_state.get("off", 0)) + 1
    try:
        yield
    finally:
        with _lock:
            _state["off"] = int(_state["off"]) - 1
