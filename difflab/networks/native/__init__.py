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
  ``$XDG_CACHE_HOME/difflab/native``, or ``~/.cache/difflab/native``. It must be owned by
  the current user and not writable by group or others (it is created with mode 0700).
  If it cannot be created or is refused, the kernels are built, with a warning, in a new
  private temporary folder for this process only. A cached library is loaded only if it
  matches the SHA-256 recorded next to it when it was built, else it is rebuilt
  (:mod:`difflab.networks.native.cache`).
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

from difflab.networks.native import cache

__all__ = ["active", "build", "disabled", "library", "library_path"]

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
_state: dict[str, object] = {}  # "lib": CDLL | None once tried; "path"; "off": disabled() depth


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


def _folder(out_dir: Path | None) -> Path:
    """The build folder: ``out_dir`` as given (refused with ``RuntimeError`` unless private),
    else the cache folder, else a new private temporary folder, with one warning saying why."""
    if out_dir is not None:
        return cache.private_folder(Path(out_dir))
    try:
        return cache.private_folder(_cache_dir())
    except (OSError, RuntimeError) as err:
        folder = cache.temporary_folder()
        warnings.warn(f"difflab: native kernel cache not used ({err}); building in {folder} "
                      f"for this process only (set DIFFLAB_NATIVE_CACHE to a folder only you "
                      f"can write to)", RuntimeWarning, stacklevel=3)
        return folder


def build(out_dir: Path | None = None) -> Path:
    """Compile ``gn_act.c`` (unless its cached build checks out) and return the library's path.

    Only a folder private to the current user is used (see :mod:`.cache`). A cached library is
    reused only if it matches the SHA-256 recorded when it was built; otherwise it is rebuilt.
    The build is written to a temporary name, then renamed, so concurrent processes never
    load a half-written file. Raises ``RuntimeError`` naming the compiler's error.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    folder = _folder(out_dir)
    target = folder / f"gn_act-{_build_key(cc)}.so"
    if _checks_out(target):
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o700)  # the linker made it 0777 & ~umask: maybe group-writable
        cache.record(Path(tmp), target)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not _checks_out(target):  # e.g. another process replaced it meanwhile
        raise RuntimeError(f"{target} does not match its recorded SHA-256 after the build")
    return target


def _checks_out(library: Path) -> bool:
    fd = cache.open_verified(library)
    if fd is None:
        return False
    os.close(fd)
    return True


def _openmp_runtimes() -> set[str]:
    maps = Path("/proc/self/maps").read_text()
    return set(re.findall(r"\S*lib(?:gomp|iomp5|omp)\S*\.so\S*", maps))


def _load() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        raise RuntimeError("native kernels are built for Linux only")
    if "OpenMP" not in torch.__config__.parallel_info():
        raise RuntimeError("PyTorch was not built with OpenMP")
    path = build()
    fd = cache.open_verified(path)  # the bytes checked are the bytes loaded
    if fd is None:
        raise RuntimeError(f"{path} does not match its recorded SHA-256")
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if _openmp_runtimes() - before:  # a second OpenMP runtime would fight PyTorch's
        raise RuntimeError(f"{path.name} loaded its own OpenMP runtime, not PyTorch's")
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    _state["path"] = path
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


def library_path() -> Path | None:
    """The file the loaded kernels came from (``None`` before a successful load)."""
    return _state.get("path")  # type: ignore[return-value]


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
