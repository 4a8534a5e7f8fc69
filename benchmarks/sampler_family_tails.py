"""Where the worst cells of a ``sampler_family.py`` run get their error: draw by draw.

    OMP_NUM_THREADS=1 python benchmarks/sampler_family_tails.py --load RUN.json [RUN2.json ...]
    ... --readme            # also into benchmarks/README.md (its own section)
    ... --load RUN.json --cell 0 20 'unipc_bh1, noisy_end [default]' 'UniPC bh1 (3) trailing'

For every held-out problem and NFE whose best-difflab / best-diffusers ratio in a saved run is
above ``--above`` (at most ``--cells`` of them per run, worst first), it reruns the two
configurations that were best there (same grids, statistics and evaluation noise as the run:
the RMS ratio is the saved one) and then both again on ``--draws`` fresh noise draws the run
never saw. It prints, per cell:

- the ratio on the run's draws, with a 90% bootstrap interval over draws;
- the ratio on the fresh draws, with its interval (the two best configurations were picked on
  the run's draws, so this one is not biased by the pick);
- the median over fresh draws of the per-draw ratio ||x_difflab - x*|| / ||x_diffusers - x*||;
- the share of diffusers' and difflab's squared error carried by the 5% of fresh draws where
  diffusers errs most, and the RMS ratio on the other 95%.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from readme_section import write_section  # noqa: E402
from sampler_family import draw_problem, evaluate, quiet_diffusers  # noqa: E402
from sampler_family_tables import NFES, best, best_label, load_results  # noqa: E402

#: the run's evaluation noise of held-out problem i is seeded 5000 + i (``sampler_family.main``);
#: the fresh draws here use FRESH_SEED + i, a range no run uses
RUN_SEED, FRESH_SEED = 5000, 90_000


def worst_cells(results: list[dict], above: float, cells: int) -> list[tuple[float, int, int]]:
    """(ratio, problem index, NFE) of the cells above ``above``, worst first."""
    out = []
    for i, res in enumerate(results):
        for m in NFES:
            r = best(res["difflab"], m) / best(res["diffusers"], m)
            if r > above:
                out.append((r, i, m))
    return sorted(out, reverse=True)[:cells]


def squared_errors(outputs: dict, label: str, m: int) -> np.ndarray:
    """Per-draw mean squared error of outputs[label][m] to the reference."""
    x, ref = outputs[label][m], outputs["reference"]
    return (x - ref).pow(2).flatten(1).mean(1).numpy()


def ratio_interval(ours: np.ndarray, theirs: np.ndarray, n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """RMS ratio and its 5th/95th bootstrap percentiles, draws resampled in pairs."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(len(ours), size=(n_boot, len(ours)))
    boot = np.sqrt(ours[idx].mean(1) / theirs[idx].mean(1))
    return (math.sqrt(ours.mean() / theirs.mean()), float(np.quantile(boot, 0.05)),
            float(np.quantile(boot, 0.95)))


def tail_stats(ours: np.ndarray, theirs: np.ndarray, share: float = 0.05) -> dict[str, float]:
    """Median per-draw ratio, the error share of diffusers' worst ``share`` of draws in each
    library, and the RMS ratio on the other draws."""
    k = max(1, int(round(share * len(theirs))))
    hard = np.argsort(theirs)[::-1][:k]
    rest = np.setdiff1d(np.arange(len(theirs)), hard)
    return {"median": float(np.median(np.sqrt(ours / np.maximum(theirs, 1e-300)))),
            "share_theirs": float(theirs[hard].sum() / theirs.sum()),
            "share_ours": float(ours[hard].sum() / ours.sum()),
            "rest": math.sqrt(ours[rest].mean() / theirs[rest].mean())}


def rerun(saved: dict, i: int, only: set[str], draws: int, tol: float,
          noise_seed: int | None = None):
    """(problem, outputs): held-out problem ``i`` of a saved run with only the configurations
    ``only`` rerun on its grids and statistics (``evaluate(..., outputs=...)``: final x per
    label and NFE, the reference, x_T); the run's evaluation noise unless ``noise_seed``."""
    problem = draw_problem(saved.get("seed_base", 1000) + 2 * i + 1)
    families = {(f[0], f[1]): tuple(f[2:]) for f in saved["families"]}
    outputs: dict = {}
    evaluate(problem, RUN_SEED + i, draws, tol, families, only=only, outputs=outputs,
             noise_seed=noise_seed)
    return problem, outputs


def cell_row(saved: dict, results: list[dict], i: int, m: int, draws: int, tol: float,
             ours: str | None = None, theirs: str | None = None) -> str:
    """One table row: held-out problem ``i`` at ``m`` NFE, difflab's ``ours`` against
    diffusers' ``theirs`` (default: each library's best there in the saved run)."""
    base = saved.get("seed_base", 1000)
    ours = ours or best_label(results[i]["difflab"], m)[0]
    theirs = theirs or best_label(results[i]["diffusers"], m)[0]
    for label, lib in ((ours, "difflab"), (theirs, "diffusers")):
        if results[i][lib].get(label, {}).get(m) is None:
            raise ValueError(f"--cell: no {lib} configuration {label!r} at {m} NFE in the run")
    rows = []
    # the run saves its --draws since this script exists; 256, its default, before
    for n, noise_seed in ((saved.get("draws", 256), None), (draws, FRESH_SEED + i)):
        problem, outputs = rerun(saved, i, {ours, theirs}, n, tol, noise_seed)
        rows.append((squared_errors(outputs, ours, m), squared_errors(outputs, theirs, m)))
    (r0, lo0, hi0), (r1, lo1, hi1) = (ratio_interval(*pair) for pair in rows)
    t = tail_stats(*rows[1])
    return (f"| {base + 2 * i + 1}: {problem.name} | {m} | {ours} | {theirs} "
            f"| {r0:.2f} [{lo0:.2f}, {hi0:.2f}] | {r1:.2f} [{lo1:.2f}, {hi1:.2f}] "
            f"| {t['median']:.2f} | {t['share_theirs']:.2f} / {t['share_ours']:.2f} "
            f"| {t['rest']:.2f} |")


HEADING = "Worst sampler-family cells, draw by draw (`benchmarks/sampler_family_tails.py`)"
INDEX_ROW = ("| `OMP_NUM_THREADS=1 python benchmarks/sampler_family_tails.py --load RUN.json` "
             "| the worst cells of a sampler-family run rerun on 2048 fresh draws: bootstrap "
             "intervals over draws, per-draw ratios, the share of the hardest 5% of draws | "
             "[Worst cells](#worst-sampler-family-cells-draw-by-draw-benchmarkssampler_family_"
             "tailspy) |")
TABLE_HEAD = ("| problem (seed) | NFE | difflab | diffusers | ratio, run's draws [90%] "
              "| ratio, {draws} fresh draws [90%] | median per-draw ratio "
              "| diffusers' worst 5%: share of error, diffusers / difflab "
              "| ratio on the other 95% |\n|---|---|---|---|---|---|---|---|---|")
README_INTRO = """\
`OMP_NUM_THREADS=1 python benchmarks/sampler_family_tails.py --load {runs} --above {above}
--readme`: every cell of those saved runs of `benchmarks/sampler_family.py` whose best-difflab /
best-diffusers ratio is above {above}, rerun with the two configurations that were best there
(same grids, statistics and evaluation noise: the first ratio is the run's), then on {draws}
fresh noise draws no run uses (the configurations were picked on the run's draws, so this ratio
is not biased by the pick). Intervals: 5th-95th percentiles of 2000 bootstrap resamplings of the
draws. "Diffusers' worst 5%": the fresh draws where diffusers' error is largest, the share of
each library's squared error they carry, and the RMS ratio on the other 95%.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=Path, nargs="+", required=True,
                        help="sampler_family.py --save JSON files")
    parser.add_argument("--above", type=float, default=0.6,
                        help="cells whose saved ratio is above this")
    parser.add_argument("--cells", type=int, default=6, help="at most this many cells per run")
    parser.add_argument("--draws", type=int, default=2048, help="fresh noise draws per cell")
    parser.add_argument("--tol", type=float, default=1e-9, help="reference DOP853 tolerance")
    parser.add_argument("--cell", nargs=4, metavar=("PROBLEM", "NFE", "DIFFLAB", "DIFFUSERS"),
                        help="instead: this one cell of the (one) run, by held-out problem "
                             "index and NFE, with these two configurations, e.g. 0 20 "
                             "'unipc_bh1, noisy_end [default]' 'UniPC bh1 (3) trailing'")
    parser.add_argument("--readme", action="store_true", help="write benchmarks/README.md")
    args = parser.parse_args()
    for path in args.load:
        if not path.is_file():
            parser.error(f"--load: no such file {path}")
    if args.cells < 1 or args.draws < 2:
        parser.error("--cells must be >= 1 and --draws >= 2")
    if args.cell and len(args.load) != 1:
        parser.error("--cell takes one --load file")
    torch.set_num_threads(1)
    quiet_diffusers()
    lines = [TABLE_HEAD.format(draws=args.draws)]
    print(lines[0], flush=True)
    for path in args.load:
        saved, results = load_results(path)
        cells, labels = worst_cells(results, args.above, args.cells), (None, None)
        if args.cell:
            i, m = int(args.cell[0]), int(args.cell[1])
            if not 0 <= i < len(results) or m not in NFES:
                parser.error(f"--cell: problem index 0..{len(results) - 1} and NFE in {NFES}")
            cells, labels = [(math.nan, i, m)], tuple(args.cell[2:])
        for _r, i, m in cells:
            try:
                lines.append(cell_row(saved, results, i, m, args.draws, args.tol, *labels))
            except ValueError as err:
                parser.error(str(err))
            print(lines[-1], flush=True)
    if args.readme:
        runs = " ".join(f"benchmarks/{p.name}" for p in args.load)
        body = README_INTRO.format(runs=runs, above=args.above, draws=args.draws)
        path = write_section(Path(__file__).with_name("README.md"), HEADING,
                             body + "\n" + "\n".join(lines), INDEX_ROW,
                             "sampler_family_tails.py")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
