"""Atomic file writes: write to a temporary file in the target folder, then rename.

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
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["WriteError", "append_text", "atomic_write", "temp_files"]

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
