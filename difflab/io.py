"""Atomic file writes, and reads that name the file when it is cut, corrupt or mismatched.

Writing: fill a temporary file in the target folder, then rename it (:func:`atomic_write`).

Reading: :func:`read_json`, :func:`read_safetensors` and :func:`load_state` turn every problem
with a file that exists (cut short, garbage, another network's tensors) into one
:class:`LoadError` line naming the file and the cause, where the file is read, so every command
and Python caller gets the same message.

A crash or an error mid-write leaves the previous file (if any) untouched and no partial file
under the final name; ``os.replace`` within one folder is atomic on POSIX and Windows. A
process killed mid-write (SIGKILL, power loss) can leave its temporary file behind: it is
named ``.{final name}.{random}.tmp`` in the same folder (:func:`temp_files` finds them, so the
next start of the program that owns the folder can remove them).

A write the file system refuses (disk full, quota, read-only, permission) raises
:class:`WriteError`, an ``OSError`` whose message is one line naming the file and the cause.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = ["LoadError", "OutputExistsError", "WriteError", "append_text", "atomic_write",
           "check_new_file", "load_state", "read_json", "read_safetensors", "temp_files"]

#: what ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")`` makes: 8 characters in between
_TEMP_TAIL = r"\.[A-Za-z0-9_]{6,}\.tmp"


class WriteError(OSError):
    """A file could not be written; ``str()`` names the file, the cause and its errno code."""

    def __init__(self, path: str | os.PathLike[str], cause: OSError,
                 note: str = "no existing file was changed"):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.note = note

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno or 0, "")
        return (f"cannot write {self.filename}: {self.strerror}{f' ({code})' if code else ''}"
                f"{'; ' + self.note if self.note else ''}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it to ``path``.

    Raises:
        WriteError: the file system refused the write (``ENOSPC``, ``EDQUOT``, ``EROFS``,
            ``EACCES``, ...); the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        raise
    return path


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append ``text`` to ``path`` (a log such as metrics.jsonl); :class:`WriteError` on a
    refused write."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise WriteError(path, e, "the lines written before are kept") from e


def temp_files(folder: str | os.PathLike[str], name_pattern: str) -> list[Path]:
    """The temporary files :func:`atomic_write` left in ``folder`` for final names matching
    the regular expression ``name_pattern`` (e.g. ``step_\\d{8}\\.json``), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    full = re.compile(rf"\.(?:{name_pattern}){_TEMP_TAIL}")
    return sorted(p for p in folder.iterdir() if full.fullmatch(p.name) and p.is_file())


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


def read_jsonl(path: str | os.PathLike[str], error: type[Exception] = LoadError
               ) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of the JSON-lines file ``path``; a
    line that is not JSON raises ``error`` naming the file and the line."""
    path = Path(path)
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((k, json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{path}, line {k}: not valid JSON ({e.msg})") from None
    return rows


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
