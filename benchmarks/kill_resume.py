"""Kill and resume: SIGKILL a small training run at random moments, resume it each time, and
check that nothing is lost and nothing is silently wrong (issue 15's acceptance run).

    python benchmarks/kill_resume.py                  # 20 kills, tiny U-Net on the digits

A reference run trains uninterrupted. Then the same run (``--checkpoint-every 1``) is started
again and again, each start SIGKILLed at a seeded random moment: every fourth start during its
start-up (imports, data, loading the checkpoint), the others a random time of up to
``--segment`` steps after its first new checkpoint appeared, i.e. while it trains and writes
checkpoints. Every start after the first resumes with ``--resume`` (or starts afresh with
``--overwrite`` while no checkpoint exists yet). After each kill every checkpoint on disk must
load; the temporary files and tensors-without-JSON a kill left must be gone once the next
start has begun training; after the kills the run trains to the end. Its final checkpoint
(weights, EMA, optimizer and RNG states) must equal the reference's bitwise. Prints a markdown
table of the counts; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from difflab.io import temp_files  # noqa: E402
from difflab.training.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402

TINY = ["--no-progress", "--device", "cpu", "--base-channels", "16", "--channel-mult", "1", "2",
        "--num-res-blocks", "1", "--attention-resolutions", "--batch-size", "8",
        "--sample-steps", "2", "--sample-every", "0", "--log-every", "5",
        "--checkpoint-every", "1", "--keep-checkpoints", "3"]


def launch(out: Path, steps: int, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "difflab", "train", "--out-dir", str(out), *TINY,
           "--steps", str(steps), "--resume" if resume else "--overwrite"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the same threads for every process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def leftovers(out: Path) -> set[Path]:
    """What a killed write leaves: atomic_write temporary files and tensors without JSON."""
    found = set(temp_files(out, r"config\.json"))
    found |= set(temp_files(out / "checkpoints", r"step_\d{8}\.(?:json|safetensors)"))
    found |= set(temp_files(out / "samples", r"step_\d{8}\.png"))
    if (out / "checkpoints").is_dir():
        found |= {p for p in (out / "checkpoints").glob("step_*.safetensors")
                  if not p.with_suffix(".json").exists()}
    return found


def latest_step(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].stem.split("_")[1]) if found else 0


@dataclass
class Counts:
    kills: int = 0
    kills_before_training: int = 0   # no new checkpoint since that start
    kills_leaving_files: int = 0     # a temporary file or tensors without JSON left behind
    files_left: int = 0
    files_stray_after_next_start: int = 0
    checkpoint_loads: int = 0
    checkpoint_load_failures: int = 0
    resumes: int = 0
    errors: list[str] = field(default_factory=list)


def check_loads(out: Path, counts: Counts) -> None:
    for p in list_checkpoints(out / "checkpoints"):
        try:
            load_checkpoint(p)
            counts.checkpoint_loads += 1
        except Exception as e:  # any failure to load is what this benchmark looks for
            counts.checkpoint_load_failures += 1
            counts.errors.append(f"{p.name}: {e}")


def kill_loop(out: Path, args: argparse.Namespace, t_start: float, t_step: float,
              counts: Counts) -> None:
    """Start, kill at a random moment, check; ``args.kills`` times (timings of the
    reference run: start-up to its first checkpoint, and per step)."""
    rng = random.Random(args.seed)
    pending: set[Path] = set()  # left by a kill, to be gone once a later start trains
    while counts.kills < args.kills:
        before = latest_step(out)
        resume = before > 0
        counts.resumes += resume
        proc = launch(out, args.steps, resume)
        during_startup = counts.kills % 4 == 3  # every fourth kill
        if during_startup:
            delay = rng.uniform(0, t_start)
            time.sleep(delay)
        else:  # while training: a few steps after its first checkpoint
            delay = rng.uniform(0, args.segment * t_step)
            while latest_step(out) == before and proc.poll() is None:
                time.sleep(0.002)
            time.sleep(delay)
        if proc.poll() is not None:  # finished (or failed) before the kill
            err = proc.stderr.read()
            proc.stderr.close()
            if proc.returncode != 0:
                counts.errors.append(f"start {counts.kills + 1}: exit {proc.returncode}: "
                                     f"{err.strip()[-500:]}")
            raise SystemExit(f"the run ended before kill {counts.kills + 1}; use more --steps")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        counts.kills += 1
        trained = latest_step(out) > before
        counts.kills_before_training += not trained
        if trained:  # this start got past its start-up clean-up
            stray = {p for p in pending if p.exists()}
            counts.files_stray_after_next_start += len(stray)
            pending = set()
        left = leftovers(out) - pending
        counts.kills_leaving_files += bool(left)
        counts.files_left += len(left)
        pending |= left
        check_loads(out, counts)
        if args.verbose:
            print(f"kill {counts.kills}: {'start-up' if during_startup else 'training'} "
                  f"+{delay:.2f} s, step {before} -> {latest_step(out)}, left "
                  f"{sorted(p.name for p in left)}", flush=True)


def final_state(out: Path, steps: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{steps:08d}.safetensors")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100, help="steps of the run")
    ap.add_argument("--segment", type=float, default=4.0,
                    help="a kill comes at most this many steps after start-up")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--verbose", action="store_true", help="a line per kill")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="difflab-kill-"))
    ref, run = work / "ref", work / "run"

    t0 = time.perf_counter()
    proc = launch(ref, args.steps, resume=False)
    while latest_step(ref) == 0 and proc.poll() is None:
        time.sleep(0.01)
    t_start = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed: {err.strip()[-2000:]}")
    t_step = (time.perf_counter() - t0 - t_start) / args.steps

    counts = Counts()
    kill_loop(run, args, t_start, t_step, counts)
    counts.resumes += 1
    final = launch(run, args.steps, resume=latest_step(run) > 0)
    _, err = final.communicate()
    if final.returncode != 0:
        counts.errors.append(f"final resume: exit {final.returncode}: {err.strip()[-500:]}")
    counts.files_stray_after_next_start += sum(p.exists() for p in leftovers(run))
    check_loads(run, counts)
    a, b = final_state(run, args.steps), final_state(ref, args.steps)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    print(f"{args.kills} SIGKILLs of `difflab train` (tiny U-Net, digits, {args.steps} steps, "
          f"--checkpoint-every 1, --keep-checkpoints 3), seed {args.seed}; start-up "
          f"{t_start:.1f} s, {1000 * t_step:.0f} ms per step; {time.perf_counter() - t0:.0f} s "
          f"in all\n")
    rows = [("kills", counts.kills),
            ("kills during start-up (no new checkpoint yet)", counts.kills_before_training),
            ("kills that left a temporary file or tensors without JSON",
             counts.kills_leaving_files),
            ("such files left", counts.files_left),
            ("such files still there after the next start", counts.files_stray_after_next_start),
            ("resumes (--resume)", counts.resumes),
            ("checkpoint loads after kills (all on disk, each time)", counts.checkpoint_loads),
            ("checkpoints that failed to load", counts.checkpoint_load_failures),
            ("final tensors bitwise equal to the uninterrupted run",
             f"{sum(torch.equal(a[k], b[k]) for k in a if k in b)} / {len(b)}")]
    print("| check | count |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for e in counts.errors:
        print(f"error: {e}")
    ok = (equal and not counts.errors and counts.checkpoint_load_failures == 0
          and counts.files_stray_after_next_start == 0)
    print(f"\n{'PASS' if ok else 'FAIL'}: work folder {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
