"""Atomic file writes, and reads that name the file when it is cut, corrupt or mismatched.

Writing: fill a temporary file in the target folder, then rename it. A crash or an error
mid-write leaves the previous file (if any) untouched and no partial file under the final name;
``os.replace`` within one folder is atomic on POSIX and Windows.

Reading: :func:`read_json`, :func:`read_safetensors` and :func:`load_state` turn every problem
with a file that exists (cut short, garbage, another network's tensors) into one
:class:`LoadError` line naming the file and the cause, where the file is read, so every command
and Python caller gets the same message.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- reading: every problem with a file that exists is one LoadError naming it ------------------

class LoadError(ValueError):
    """A file that exists but cannot be used: cut short, corrupt, or written for another
    network. The message names the file and the cause in one line (the CLI prints it and
    exits with status 2)."""


def read_json(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of ``path``; a missing file is FileNotFoundError, an unreadable or
    invalid one (e.g. cut short by a crash outside difflab's atomic writes) a LoadError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read {path}: {_reason(e)}") from None
    try:
        return json.loads(text)
    except ValueError as e:  # json.JSONDecodeError
        raise LoadError(f"{path} is not valid JSON (cut short or corrupt?): {e}") from None


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); a missing file is FileNotFoundError,
    a cut or garbage one (safetensors checks that its header covers the file exactly) a
    LoadError. Nothing is unpickled."""
    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except SafetensorError as e:
        raise LoadError(f"{path} is not a readable safetensors file (cut short or corrupt?): "
                        f"{e}") from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {_reason(e)}") from None


def load_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
               what: str = "its network config") -> None:
    """``module.load_state_dict(state)`` after comparing names and shapes, so that tensors of
    another architecture give one line naming ``source`` (the file), e.g. ``runs/x/...
    .safetensors does not match its network config: 12 tensors of other shapes, first
    'in_conv.weight' [32, 1, 3, 3] in the file vs [64, 1, 3, 3] in the network`` instead of
    PyTorch's message of one line per tensor."""
    own = module.state_dict()
    shapes = [(k, list(state[k].shape), list(v.shape)) for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        k, got, want = shapes[0]
        problems.append(f"{_count(shapes, 'tensor')} of other shapes, first {k!r} {got} in "
                        f"the file vs {want} in the network")
    if missing:
        problems.append(f"{_count(missing, 'tensor')} missing, first {missing[0]!r}")
    if unexpected:
        problems.append(f"{_count(unexpected, 'unexpected tensor')}, first {unexpected[0]!r}")
    if problems:
        raise LoadError(f"{source} does not match {what}: {'; '.join(problems)}")
    module.load_state_dict(state)


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _reason(e: BaseException) -> str:
    """An OS error's cause without the repeated file name (``Permission denied``)."""
    return getattr(e, "strerror", None) or str(e)


class OutputExistsError(ValueError):
    """An output file that exists and may not be replaced (the CLI's ``--overwrite``)."""


def check_new_file(path: str | os.PathLike[str], overwrite: bool = False,
                   what: str = "output") -> None:
    """Refuse ``path`` as an output if it exists, unless ``overwrite``: an OutputExistsError
    naming ``what`` (e.g. the option ``--out``) and the file."""
    path = Path(path)
    if path.exists() and not overwrite:
        kind = "folder" if path.is_dir() else "file"
        raise OutputExistsError(f"{what} {path}: the {kind} exists; pass --overwrite to "
                                "replace it, or choose another name")
