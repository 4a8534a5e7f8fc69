"""Could another grid win one cell of a ``sampler_family.py`` run? A sweep of grid families.

    OMP_NUM_THREADS=1 python benchmarks/sampler_family_grids.py \\
        --load benchmarks/sampler_family_17000.json --cell 7 10

For held-out problem ``PROBLEM`` of a saved run at ``NFE``, on the run's own evaluation noise
and reference (the same draws as the saved errors), it runs a few difflab samplers on every
``grid_family`` grid of a (rho, warp, smallest level) lattice, and prints a markdown table: the
best grids found, and for comparison the saved best configuration of each library, each with
its RMS error, its ratio to diffusers' best and its three largest per-draw errors
||x - x*||. It is an oracle search (the grids are scored on the draws they are reported on), so
a grid it finds is not a held-out result; what it can show is a negative: that no grid of the
lattice does better on the cell. Where one or two draws that end in another mixture component
than the reference's carry the RMS, the per-draw columns show whether both libraries lose the
same draws.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from sampler_family import quiet_diffusers, rms, sigma_min  # noqa: E402
from sampler_family_tables import NFES, best_label, load_results  # noqa: E402
from sampler_family_tails import rerun  # noqa: E402

from difflab.samplers import local_unipc, unipc_bh1  # noqa: E402
from difflab.samplers.ays import grid_family  # noqa: E402

RHOS = (1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, math.inf)
WARPS = (0.35, 0.5, 0.65, 0.8, 1.0, 1.25, 1.6)
ENDS = (None, 2e-3, 2e-4)  # None: the problem's smallest level
SAMPLERS = {"local_unipc": (local_unipc, {}), "local_unipc, order=3": (local_unipc, {"order": 3}),
            "unipc_bh1": (unipc_bh1, {})}


def draw_errors(x: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """The three largest per-draw distances ||x - x*||."""
    return (x - ref).flatten(1).norm(dim=1).sort(descending=True).values[:3].tolist()


def row(name: str, x: torch.Tensor, ref: torch.Tensor, theirs: float) -> tuple[float, str]:
    e = rms(x, ref)
    top = " / ".join(f"{v:.3f}" for v in draw_errors(x, ref))
    return e, f"| {name} | {e:.4g} | {e / theirs:.2f} | {top} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=Path, required=True, help="sampler_family.py --save JSON")
    parser.add_argument("--cell", nargs=2, type=int, required=True, metavar=("PROBLEM", "NFE"),
                        help="held-out problem index and NFE")
    parser.add_argument("--top", type=int, default=5, help="best grids to list")
    parser.add_argument("--tol", type=float, default=1e-9, help="reference DOP853 tolerance")
    args = parser.parse_args()
    if not args.load.is_file():
        parser.error(f"--load: no such file {args.load}")
    if args.top < 1:
        parser.error("--top must be >= 1")
    try:
        saved, results = load_results(args.load)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        parser.error(f"--load: {args.load} is not a sampler_family.py --save file ({err})")
    i, m = args.cell
    if not 0 <= i < len(results) or m not in NFES:
        parser.error(f"--cell: problem index 0..{len(results) - 1} and NFE in {NFES}")
    torch.set_num_threads(1)
    quiet_diffusers()
    ours = best_label(results[i]["difflab"], m)[0]
    theirs = best_label(results[i]["diffusers"], m)[0]
    problem, outputs = rerun(saved, i, {ours, theirs}, saved.get("draws", 256), args.tol)
    ref, x_T, proc = outputs["reference"], outputs["x_T"], problem.process
    e_theirs = rms(outputs[theirs][m], ref)
    lines = [row(f"diffusers' best in the run: {theirs}", outputs[theirs][m], ref, e_theirs)[1],
             row(f"difflab's best in the run: {ours}", outputs[ours][m], ref, e_theirs)[1]]
    swept = []
    for rho, warp, end in itertools.product(RHOS, WARPS, ENDS):
        ts = grid_family(proc, m, rho, warp, sigma_min=sigma_min(problem) if end is None else end)
        for name, (fn, opts) in SAMPLERS.items():
            x = fn(problem.data, x_T, ts, torch.Generator().manual_seed(0), **opts)
            if torch.isfinite(x).all():
                swept.append(row(f"{name}, rho={rho:g}, warp={warp:g}, end={end or 'table'}",
                                 x, ref, e_theirs))
    swept.sort(key=lambda r: r[0])
    n = len(SAMPLERS) * len(RHOS) * len(WARPS) * len(ENDS)
    print(f"{problem.name} (seed {saved.get('seed_base', 1000) + 2 * i + 1}), {m} NFE, "
          f"{ref.shape[0]} draws (the run's); the best {args.top} of {n} swept grids:\n")
    print("| sampler and grid | RMS | / diffusers' best | largest per-draw errors |")
    print("|---|---|---|---|")
    print("\n".join(lines + [r[1] for r in swept[:args.top]]))


if __name__ == "__main__":
    main()
