"""Few-step generation: distilled students against their teacher's training-free samplers.

The teacher is the default digits model (``difflab train`` defaults, 1500 steps), trained once
into ``--teacher`` and timed (``distill_teacher.py``). Rows: the teacher with the best of the
few-step samplers (by FID) at 1, 2, 4 and 8 network evaluations and with ``difflab sample``'s
default (DDIM, 50 steps); then every available method of ``DISTILL_METHODS`` distilled from the
teacher with its defaults (``difflab distill METHOD --teacher ...`` in a child process, timed in
CPU minutes) and sampled at 1, 2, 4 and 8 steps with the student's own sampler. Scores:
``distill_eval.py`` (SVM accuracy against the requested class; FID in the built-in digits
features against ``digits:test``). Also a labelled PNG grid of 1/2/4-step samples per row.

    python benchmarks/distillation.py --teacher runs/distill-teacher --readme
    python benchmarks/distillation.py --quick --teacher /tmp/t --out /tmp/d   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from difflab.data import save_labelled_grid
from difflab.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parent))
from distill_eval import (  # noqa: E402
    REFERENCE,
    Judge,
    make_judge,
    nfe_of,
    real_floor,
    sample_and_score,
    steps_for_nfe,
)
from distill_report import goal_lines, markdown, samplers_table, write_readme  # noqa: E402
from distill_teacher import ROOT, run_timed, train_teacher  # noqa: E402

NFES = (1, 2, 4, 8)
GRID_STEPS = (1, 2, 4)
FEW_STEP_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh1", "unipc_bh2", "heun",
                     "dpm_solver")
SAMPLERS_ARG = ",".join(FEW_STEP_SAMPLERS)
TEACHER_DEFAULT = ("ddim", 50)  # difflab sample's default sampler for a trained model
#: extra options of a ``--quick`` smoke run (the rest: ``--steps 4``)
QUICK_OPTIONS = {"progressive": ["--start-steps", "8", "--round-steps", "4"],
                 "reflow": ["--pairs", "64", "--teacher-steps", "4"]}
#: the rows computed so far, kept in ``--out`` so that methods can be (re)run one at a time
RESULTS = "results.json"


def available_methods(wanted: list[str] | None) -> list[str]:
    """Registered distillation methods (all, or ``wanted`` in that order); none before the
    registry exists. A wanted method that is not registered is a ValueError."""
    try:
        from difflab.recipes.distill import DISTILL_METHODS
    except ImportError:
        DISTILL_METHODS = {}
    if wanted is None:
        return list(DISTILL_METHODS)
    missing = [m for m in wanted if m not in DISTILL_METHODS]
    if missing:
        raise ValueError(f"--methods: {missing} not registered (available: "
                         f"{sorted(DISTILL_METHODS) or 'none yet'})")
    return wanted


def public(row: dict) -> dict:
    """A row without its samples (for JSON)."""
    return {k: v for k, v in row.items() if k != "x"}


def stored(row: dict) -> dict:
    """A row for the results file: the first 10 samples (the grid's) kept as lists."""
    return {**public(row), "grid_x": row["x"][:10].tolist()}


def restored(row: dict) -> dict:
    return {**row, "x": torch.tensor(row["grid_x"])}


def load_results(out: Path, key: dict) -> dict:
    """Rows of an earlier run into ``out`` with the same teacher, samples and seeds
    (``key``); empty otherwise."""
    path = out / RESULTS
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    return old if old.get("key") == key else {}


def student_pipelines(method: str, out: Path) -> dict[int, Path]:
    """The student to run at each step count: progressive distillation keeps one per round
    (``RUN/steps_N``); the other methods have one student for every step count."""
    if method == "progressive":
        from difflab.recipes.distill.progressive import progressive_students
        rounds = {int(k): Path(v) for k, v in progressive_students(out).items()}
        final = min(rounds)
        return {k: rounds.get(k, rounds[final]) for k in NFES}
    return dict.fromkeys(NFES, out)


def best_teacher_row(pipe: Pipeline, judge: Judge, nfe: int, args) -> dict:
    """The teacher at (at most) ``nfe`` evaluations with the sampler of lowest FID; the row
    lists every sampler tried."""
    tried = []
    for sampler in args.samplers:
        fit = steps_for_nfe(pipe, sampler, nfe)
        if fit is None:
            continue
        row = sample_and_score(pipe, judge, sampler, fit[0], args.n, args.seed)
        tried.append({**row, "nfe": fit[1]})
        print(f"  teacher {sampler:>10} {fit[0]} steps ({fit[1]} NFE): "
              f"FID {row['fid']:.4f}, accuracy {row['accuracy']:.3f}", flush=True)
    # ties (at 1-2 NFE several samplers reduce to DDIM): the first in --samplers order
    best = min(tried, key=lambda r: (round(r["fid"], 4), args.samplers.index(r["sampler"])))
    return {"method": "teacher", **best, "target_nfe": nfe,
            "tried": [public(r) for r in tried]}


def teacher_rows(pipe: Pipeline, judge: Judge, args) -> list[dict]:
    rows = [best_teacher_row(pipe, judge, nfe, args) for nfe in NFES]
    sampler, steps = TEACHER_DEFAULT
    row = sample_and_score(pipe, judge, sampler, steps, args.n, args.seed)
    rows.append({"method": "teacher", **row, "nfe": nfe_of(pipe, sampler, steps),
                 "target_nfe": None, "reference": True})
    return rows


def distill(method: str, teacher: Path, out: Path, quick: bool) -> dict:
    """Distil with the method's defaults in a child process; its wall and CPU time."""
    cmd = [sys.executable, "-m", "difflab", "distill", method, "--teacher", str(teacher),
           "--out-dir", str(out), "--no-progress", "--overwrite"]
    if quick:
        cmd += ["--steps", "4", *QUICK_OPTIONS.get(method, [])]
    print("distilling:", " ".join(cmd), flush=True)
    cost = run_timed(cmd, ROOT)
    return {"command": cmd, "wall_s": cost.wall_s, "cpu_s": cost.cpu_s}


def student_rows(method: str, args, judge: Judge, teacher_cpu_s: float | None) -> list[dict]:
    """Distil ``method`` and score its student at 1, 2, 4 and 8 of its own sampler's steps."""
    cost = distill(method, Path(args.teacher), Path(args.out) / method, args.quick)
    rows = []
    for steps, folder in student_pipelines(method, Path(args.out) / method).items():
        pipe = Pipeline.from_pretrained(folder)
        sampler, _, options = pipe.default_sampler()
        row = sample_and_score(pipe, judge, sampler, steps, args.n, args.seed, options)
        rows.append({"method": method, **row, "nfe": nfe_of(pipe, sampler, steps, options),
                     "target_nfe": steps, "distill_cpu_s": cost["cpu_s"],
                     "distill_wall_s": cost["wall_s"],
                     "cost_ratio": cost["cpu_s"] / teacher_cpu_s if teacher_cpu_s else None,
                     "options": options})
        print(f"  {method} {steps} steps: FID {row['fid']:.4f}, accuracy "
              f"{row['accuracy']:.3f}", flush=True)
    return rows


def save_sample_grid(rows: list[dict], path: Path) -> Path:
    """One grid row (digits 0-9) per method and step count in ``GRID_STEPS``."""
    chosen = [r for r in rows if r.get("target_nfe") in GRID_STEPS]
    images = torch.cat([r["x"][:10] for r in chosen])
    labels = [f"{r['method']}, {r['steps']} step{'s' * (r['steps'] > 1)} ({r['sampler']})"
              for r in chosen]
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_labelled_grid(images, path, nrow=10, scale=8, row_labels=labels,
                              caption="digits 0-9, seeds 1000-1009; teacher rows: its best "
                                      "training-free sampler at that NFE")


def report_text(rows: list[dict], floor: dict, teacher: dict, judge: Judge, args) -> str:
    """The markdown of the README section: setup, table, samplers tried, goals, grid."""
    quick = " **(smoke run: `--quick`, not a measurement)**" if args.quick else ""
    return "\n".join([
        "```bash", "python benchmarks/distillation.py --teacher runs/distill-teacher --readme",
        "```", "",
        f"Teacher: `difflab train` defaults ({teacher['steps'] or 1500} steps), "
        f"{training_time(teacher)}{quick}. "
        f"{args.n} class-balanced samples per row (seeds {args.seed}.., digits 0-9 in turn), "
        f"8-bit. Accuracy: the SVM of `digits_accuracy.py` (real held-out digits: "
        f"{judge.svm_real_accuracy:.3f}). FID: built-in digits features "
        f"(`{judge.extractor.name}`, trained on `digits:train`) against `{REFERENCE}` "
        f"({judge.n_reference} digits; the teacher trains on all digits, so they are held out "
        f"from the feature network only). Teacher rows at 1-8 NFE: the sampler of lowest FID "
        f"among {', '.join(args.samplers)} within that NFE; students: their own sampler. "
        f"CPU-min: user + system time of `difflab distill` with the method's defaults; ratio "
        f"to the teacher's training CPU time.", "",
        markdown(rows, floor), "", "Teacher, every training-free sampler tried (FID, steps, "
        "NFE):", "", samplers_table(rows), "", "Goals of issue 17:", "",
        *goal_lines(rows, teacher, floor), "", f"![1/2/4-step samples]({grid_link(args)})"])


def training_time(teacher: dict) -> str:
    if teacher["cpu_s"] is None:
        return "reused without a time record (training time unknown)"
    return f"trained in {teacher['wall_s'] / 60:.1f} min wall, {teacher['cpu_s'] / 60:.1f} CPU-min"


def grid_link(args: argparse.Namespace) -> str:
    """The grid's path relative to the README's folder (benchmarks/ without ``--readme``)."""
    readme = Path(args.readme or ROOT / "benchmarks" / "README.md").resolve()
    return os.path.relpath(Path(args.grid).resolve(), readme.parent)


def save_results(out: Path, key: dict, by_method: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = {m: [stored(r) for r in rs] for m, rs in by_method.items()}
    (out / RESULTS).write_text(json.dumps({"key": key, "rows": rows}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="runs/distill-teacher",
                    help="teacher run folder: trained here once, reused after")
    ap.add_argument("--out", default="runs/distill-bench", help="folder of the students")
    ap.add_argument("--methods", default=None, help="comma-separated methods to distil now "
                    "(default: all registered; 'none': only the report of earlier rows); rows of "
                    "methods distilled by an earlier run into the same --out (same teacher, --n, "
                    "--seed) are kept in the table")
    ap.add_argument("--n", type=int, default=1000, help="samples per row")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--samplers", default=SAMPLERS_ARG,
                    help="training-free samplers tried on the teacher")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads here")
    ap.add_argument("--quick", action="store_true", help="smoke run: a 40-step teacher "
                    "(batch 32), 100 samples, 3 samplers, a 50-step feature network, 4 "
                    "distillation steps")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--grid", default="docs/images/distill_grid.png")
    ap.add_argument("--readme", nargs="?", const="benchmarks/README.md", default=None,
                    help="write the section into this README (default benchmarks/README.md)")
    args = ap.parse_args()
    run(args)


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.n = min(args.n, 100)
        args.samplers = "ddim,dpmpp_2m,heun" if args.samplers == SAMPLERS_ARG else args.samplers
    args.samplers = args.samplers.split(",")
    args.teacher, args.out = str(Path(args.teacher).resolve()), str(Path(args.out).resolve())
    wanted = None if args.methods is None else [m for m in args.methods.split(",") if m]
    methods = [] if args.methods == "none" else available_methods(wanted)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = train_teacher(args.teacher, 40 if args.quick else None,
                            ["--batch-size", "32"] if args.quick else [])
    print(f"teacher: {training_time(teacher)}{' (reused)' if teacher['reused'] else ''}",
          flush=True)
    judge = make_judge(50 if args.quick else 1500)
    key = {"teacher": args.teacher, "n": args.n, "seed": args.seed, "samplers": args.samplers,
           "quick": args.quick}
    done = load_results(Path(args.out), key)
    by_method = {m: [restored(r) for r in rs] for m, rs in done.get("rows", {}).items()}
    if "teacher" not in by_method:
        by_method["teacher"] = teacher_rows(Pipeline.from_pretrained(args.teacher), judge, args)
    for method in methods:
        by_method[method] = student_rows(method, args, judge, teacher["cpu_s"])
        save_results(Path(args.out), key, by_method)
    save_results(Path(args.out), key, by_method)
    methods = [m for m in by_method if m != "teacher" and m in available_methods(None)]
    rows = [r for m in ("teacher", *methods) for r in by_method[m]]
    floor = real_floor(judge, args.n)
    text = report_text(rows, floor, teacher, judge, args)
    print(text)
    save_sample_grid(rows, Path(args.grid))
    result = {"teacher": teacher, "methods": methods, "n": args.n, "quick": args.quick,
              "extractor": judge.extractor.name, "reference": REFERENCE,
              "real_floor": floor, "rows": [public(r) for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.readme:
        print(f"wrote {write_readme(Path(args.readme), text)}")
    return result


if __name__ == "__main__":
    main()
