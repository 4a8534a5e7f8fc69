"""The teacher of ``benchmarks/distillation.py``: the default digits model, trained once.

``difflab train`` with its default options runs in a child process; its wall time and CPU
time (user + system of the child, ``resource.getrusage(RUSAGE_CHILDREN)``) are the reference
"teacher training time" and are kept beside the run in ``teacher_time.json``, so a later
benchmark reuses both the run and its cost.
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


def teacher_command(folder: Path, steps: int | None) -> list[str]:
    """``difflab train`` with default options into ``folder`` (``steps`` only for smoke runs)."""
    cmd = [sys.executable, "-m", "difflab", "train", "--out-dir", str(folder), "--no-progress"]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    return cmd


def train_teacher(folder: str | Path, steps: int | None = None) -> dict:
    """Train the teacher into ``folder`` unless a finished run with its time record is there
    (then reuse it); returns the record: command, steps, wall_s, cpu_s, reused."""
    folder = Path(folder).resolve()
    record = folder / RECORD
    if record.is_file():
        info = json.loads(record.read_text())
        if info.get("steps") == steps:
            return {**info, "reused": True}
        raise ValueError(f"--teacher {folder} holds a {info.get('steps') or 'default'}-step "
                         f"teacher, not {steps or 'default'}; give another folder")
    cmd = teacher_command(folder, steps)
    if folder.exists():
        cmd.append("--overwrite")  # an unfinished run (no time record): start afresh
    print("training the teacher:", " ".join(cmd), flush=True)
    cost = run_timed(cmd)
    info = {"command": cmd, "steps": steps, **asdict(cost)}
    record.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "reused": False}


if __name__ == "__main__":
    print(json.dumps(train_teacher(sys.argv[1]), indent=2))
