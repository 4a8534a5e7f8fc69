"""Where the native kernels are built, and the checks made before one is loaded.

Loading a shared library runs its code, so a library is only built into, and loaded from, a
folder that nobody but the current user can write to: owned by the user and not writable by
group or others (a new folder is made with mode 0700). A folder that fails this is refused,
never repaired, since whatever another user planted there may still be in it. The fallback is
a new folder from :func:`tempfile.mkdtemp`: created by this process, mode 0700, with a name
nobody can guess in advance, removed when the process exits.

At build time the library's SHA-256 is written next to it (``<name>.sha256``, same folder).
Before loading, the library and that record must be regular files owned by the user and not
writable by others, and the digest of the bytes must match. The check reads the library
through the same open file descriptor that the loader is then given
(``/proc/self/fd/<n>``), so the bytes checked are the bytes loaded.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["digest_path", "open_verified", "private_folder", "record", "refusal",
           "temporary_folder"]


def _uid() -> int:
    """The current user (a function, so tests can pretend to be someone else)."""
    return os.getuid()


def _unsafe(st: os.stat_result) -> str | None:
    """Why an entry with this status could have been written by another user, or None."""
    if st.st_uid != _uid():
        return f"owned by uid {st.st_uid}, not {_uid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def refusal(folder: Path) -> str | None:
    """Why ``folder`` may not hold libraries to load, or ``None`` when it is private to the
    current user. A link is followed: what counts is the folder it leads to."""
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    return _unsafe(st)


def private_folder(folder: Path) -> Path:
    """``folder``, created with mode 0700 if missing. Raises ``OSError`` when it cannot be
    created and ``RuntimeError`` naming the folder and the cause when it is not private."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    reason = refusal(folder)
    if reason is not None:
        raise RuntimeError(f"native kernel cache {folder} refused: {reason}")
    return folder


def temporary_folder() -> Path:
    """A new private folder for this process only; removed at exit (a loaded library stays
    mapped after its file is deleted)."""
    folder = Path(tempfile.mkdtemp(prefix="difflab-native-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def digest_path(library: Path) -> Path:
    """The file holding ``library``'s SHA-256, next to it."""
    return library.with_name(library.name + ".sha256")


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def record(built: Path, library: Path) -> None:
    """Write the digest of ``built`` (the fresh build, not yet renamed) as ``library``'s
    record: to a temporary name, then renamed, so a reader sees all of it or none."""
    fd = os.open(built, os.O_RDONLY)
    try:
        text = _sha256(fd) + "\n"
    finally:
        os.close(fd)
    tmp_fd, tmp = tempfile.mkstemp(suffix=".sha256", dir=library.parent)
    try:
        with os.fdopen(tmp_fd, "w") as f:
            f.write(text)
        os.replace(tmp, digest_path(library))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open_own_file(path: Path) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file (not a link) that only the
    current user can write; otherwise ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or _unsafe(st) is not None:
        os.close(fd)
        return None
    return fd


def open_verified(library: Path) -> int | None:
    """A descriptor of ``library`` whose bytes match its recorded SHA-256, both files being
    the current user's own; ``None`` when anything is missing, foreign or different (the
    caller then rebuilds). The caller closes the descriptor."""
    rec_fd = _open_own_file(digest_path(library))
    if rec_fd is None:
        return None
    try:
        expected = os.read(rec_fd, 200).decode("ascii", "replace").strip()
    finally:
        os.close(rec_fd)
    fd = _open_own_file(library)
    if fd is None:
        return None
    if _sha256(fd) != expected:
        os.close(fd)
        return None
    return fd
