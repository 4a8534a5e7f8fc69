"""The run folder at the start of training: stale temporary files, and whether it already
holds another run.

A run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoints/step_*`` and
``samples/step_*.png``. Starting a run in it:

- removes what killed writes left behind: :func:`difflab.io.atomic_write`'s temporary files
  of those names (``.step_00000003.safetensors.k2j4h_x1.tmp``) and a checkpoint's tensors
  whose JSON was never written (only these names, only in this folder and its
  ``checkpoints/`` and ``samples/``);
- refuses (:class:`RunFolderError`) when the folder already holds a run and the new one does
  not continue it (resumed from one of its checkpoints), since writing into it would mix two
  runs: a newer checkpoint of the old run would stay "latest" for a later ``--resume``;
- with ``overwrite`` deletes the old run's files (the names above; anything else in the
  folder is left alone) and starts afresh.

While a run trains, its process holds a lock on the folder (:func:`run_lock`), so a second
process started there is refused rather than deleting the first one's temporary files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io import temp_files
from .checkpoint import CKPT_RE

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolderError", "clean_stale_files", "clear_run",
           "prepare_run_folder", "run_files", "run_lock"]

#: the lock file a running training process holds (``run_lock``)
LOCK_NAME = ".difflab.lock"

_STEP = r"step_\d{8}"
#: (sub-folder, regular expression of the final names difflab writes there)
_OWN_FILES = (("", r"config\.json"), ("checkpoints", _STEP + r"\.(?:json|safetensors)"),
              ("samples", _STEP + r"\.png"))


class RunFolderError(ValueError):
    """The run folder holds another run (or a resume and ``overwrite`` contradict)."""


def clean_stale_files(out_dir: str | Path) -> list[Path]:
    """Remove killed writes' temporary files and tensors without a JSON; return them."""
    out = Path(out_dir)
    stale = [p for sub, names in _OWN_FILES for p in temp_files(out / sub, names)]
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        stale += sorted(p for p in ckpts.glob("step_*.safetensors")
                        if CKPT_RE.match(p.with_suffix(".json").name)
                        and not p.with_suffix(".json").exists())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def run_files(out_dir: str | Path) -> list[Path]:
    """The files of a run in ``out_dir``: config.json, metrics.jsonl, checkpoints, grids."""
    out = Path(out_dir)
    found = [out / n for n in ("config.json", "metrics.jsonl") if (out / n).is_file()]
    for sub, pattern in (("checkpoints", "step_*.json"), ("checkpoints", "step_*.safetensors"),
                         ("samples", "step_*.png")):
        if (out / sub).is_dir():
            found += sorted((out / sub).glob(pattern))
    return found


def _describe(files: list[Path], out: Path) -> str:
    names = [p.name for p in files if p.parent == out]
    steps = sorted({int(m.group(1)) for p in files if (m := CKPT_RE.match(p.name))})
    if steps:
        names.append(f"{len(steps)} checkpoint{'s' * (len(steps) > 1)} up to step {steps[-1]}")
    return ", ".join(names) or f"{len(files)} files"


def clear_run(out_dir: str | Path) -> list[Path]:
    """Delete the run files of ``out_dir`` (see :func:`run_files`) and its stale temporary
    files; other files are kept. Returns what was deleted."""
    gone = clean_stale_files(out_dir) + run_files(out_dir)
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def prepare_run_folder(out_dir: str | Path, resumed_from: str | Path | None = None,
                       overwrite: bool = False) -> list[Path]:
    """Make ``out_dir`` ready for a run that starts now; return the files removed.

    Args:
        out_dir: the run folder (created by the caller's first write if missing).
        resumed_from: the checkpoint the run was resumed from, if any; a run resumed from a
            checkpoint inside ``out_dir/checkpoints`` continues the run there.
        overwrite: delete an existing run's files instead of refusing.

    Raises:
        RunFolderError: ``out_dir`` holds a run that this one does not continue, and not
            ``overwrite``; or ``overwrite`` would delete the checkpoint being resumed.
    """
    out = Path(out_dir)
    continues = (resumed_from is not None and (out / "checkpoints").is_dir()
                 and Path(resumed_from).resolve().parent == (out / "checkpoints").resolve())
    if overwrite and continues:
        raise RunFolderError(f"--overwrite would delete {resumed_from}, the checkpoint being "
                             f"resumed; drop --overwrite to continue that run, or resume into "
                             f"another --out-dir")
    existing = run_files(out)
    if existing and not continues:
        if not overwrite:
            raise RunFolderError(
                f"run folder {out} already holds a run ({_describe(existing, out)}); pass "
                f"--resume to continue it or --overwrite to delete it and start afresh")
        return clear_run(out)
    return clean_stale_files(out)


@contextmanager
def run_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` while a run writes into it, so that a second
    process starting in the same folder is refused instead of deleting the first one's
    temporary files (POSIX ``flock``; where locks are unsupported, no lock is taken).

    Raises:
        RunFolderError: another process holds the lock.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = out / LOCK_NAME
    with open(path, "a+") as f:
        locked = True
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise RunFolderError(f"run folder {out} is in use by another process (pid "
                                 f"{holder}); wait for it to finish or choose another "
                                 f"--out-dir") from None
        except OSError:  # e.g. ENOLCK on a network file system: run unlocked
            locked = False
        try:
            if locked:
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
