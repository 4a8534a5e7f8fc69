"""The teacher of ``benchmarks/distillation.py``: the default digits model, trained once.

``difflab train`` with its default options runs in a child process; its wall time and CPU
time (user + system of the child, ``resource.getrusage(RUSAGE_CHILDREN)``) are the reference
"teacher training time" and are kept beside the run in ``teacher_time.json``, so a later
benchmark reuses both the run and its cost. A finished run without that record (trained
elsewhere) is reused too, its training time unknown.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = "teacher_time.json"
DEFAULT_STEPS = 1500  # difflab train's default


@dataclass
class Cost:
    """Wall and CPU seconds of some work (CPU: all threads of the process or its children)."""

    wall_s: float
    cpu_s: float

    @property
    def cpu_min(self) -> float:
        return self.cpu_s / 60.0


def run_timed(cmd: list[str], cwd: Path = ROOT) -> Cost:
    """Run ``cmd`` to completion (a failure raises) and return its wall and CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Cost(wall, cpu)


def teacher_command(folder: Path, steps: int | None, extra: list[str] = ()) -> list[str]:
    """``difflab train`` with default options into ``folder`` (``steps`` and ``extra`` options
    only for smoke runs)."""
    cmd = [sys.executable, "-m", "difflab", "train", "--out-dir", str(folder), "--no-progress"]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    return cmd + list(extra)


def finished_steps(folder: Path) -> int | None:
    """The step of the last checkpoint in a run folder, None when it has none."""
    metas = sorted((folder / "checkpoints").glob("step_*.json"))
    return json.loads(metas[-1].read_text()).get("step") if metas else None


def train_teacher(folder: str | Path, steps: int | None = None,
                  extra: list[str] = ()) -> dict:
    """The teacher in ``folder``: trained there (timed) unless it holds a finished run of
    ``steps`` (None: the default 1500), which is reused with its time record, or without one
    (a run trained elsewhere: ``wall_s`` and ``cpu_s`` None). Returns command, steps, wall_s,
    cpu_s, reused."""
    folder = Path(folder).resolve()
    record = folder / RECORD
    done = finished_steps(folder) if folder.is_dir() else None
    if done is not None and done == (steps or DEFAULT_STEPS):
        if record.is_file():
            return {**json.loads(record.read_text()), "reused": True}
        return {"command": None, "steps": steps, "wall_s": None, "cpu_s": None,
                "reused": True}
    cmd = teacher_command(folder, steps, extra)
    if folder.exists():
        cmd.append("--overwrite")  # an unfinished or other run: start afresh
    print("training the teacher:", " ".join(cmd), flush=True)
    cost = run_timed(cmd)
    info = {"command": cmd, "steps": steps, **asdict(cost)}
    record.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "reused": False}


if __name__ == "__main__":
    print(json.dumps(train_teacher(sys.argv[1]), indent=2))
