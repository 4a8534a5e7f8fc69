"""The local-Gaussian samplers against the methods they generalise, on the sampler family.

    OMP_NUM_THREADS=1 python benchmarks/local_gaussian.py                  # markdown tables
    OMP_NUM_THREADS=1 python benchmarks/local_gaussian.py --readme         # also README.md

Every held-out problem of ``sampler_family.py``'s seed ranges ``--seed-bases`` (problem i =
``draw_problem(B + i)``, i odd), on its default (trailing) grid. Errors are RMS to the model's
own PF-ODE solution (DOP853), for ``local_gaussian`` (its defaults, and ``order=1``) and
``local_unipc`` (order 2, and 3), each against itself with u = 0: DPM-Solver++(2M)
(``dpmpp_2m``), DDIM and UniPC bh2. Nothing is fitted to any problem: u is fitted per
example at run time from the sampler's own evaluations.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from readme_section import write_section  # noqa: E402
from sampler_family import draw_problem, noise, rms  # noqa: E402

from difflab.samplers import (  # noqa: E402
    ddim,
    dpmpp_2m,
    local_gaussian,
    local_unipc,
    reference_solution,
    unipc_bh2,
)

HEADING = "The local-Gaussian samplers (`benchmarks/local_gaussian.py`)"
INDEX_ROW = ("| `OMP_NUM_THREADS=1 python benchmarks/local_gaussian.py` | `local_gaussian` and "
             "`local_unipc` against DPM-Solver++(2M), UniPC bh2 and DDIM on the default grids "
             "of held-out sampler-family problems | [Local Gaussian]"
             "(#the-local-gaussian-samplers-benchmarkslocal_gaussianpy) |")
SAMPLERS = {"local_gaussian": local_gaussian,
            "local_gaussian, order=1": functools.partial(local_gaussian, order=1),
            "local_unipc": local_unipc,
            "local_unipc, order=3": functools.partial(local_unipc, order=3),
            "dpmpp_2m": dpmpp_2m, "unipc_bh2": unipc_bh2, "ddim": ddim}
#: the ratios reported: each local-Gaussian sampler to itself with u = 0, then the bases
RATIOS = [("local_gaussian", "dpmpp_2m"), ("local_gaussian, order=1", "ddim"),
          ("local_unipc", "unipc_bh2"), ("local_unipc", "dpmpp_2m"),
          ("local_unipc, order=3", "local_unipc"), ("local_unipc, order=3", "unipc_bh2"),
          ("unipc_bh2", "dpmpp_2m"),
          ("ddim", "dpmpp_2m")]
#: the pairs of the per-problem table
SHOWN = [("local_gaussian", "dpmpp_2m"), ("local_unipc", "unipc_bh2")]


def errors(problem, draws: int, nfes: list[int], seed: int) -> dict[str, dict[int, float]]:
    """{sampler: {nfe: rms}} on one problem, from ``draws`` noise draws."""
    proc = problem.process
    x_T = noise(problem, draws, seed) * float(proc.sigma(proc.t_max))
    ref = reference_solution(problem.data, x_T, 1e-9)
    return {name: {m: rms(run(problem.data, x_T, problem.default_grid(m)), ref) for m in nfes}
            for name, run in SAMPLERS.items()}


def tables(names: list[str], results: list[dict], nfes: list[int]) -> str:
    """Per-problem errors of the SHOWN pairs, and median / geometric-mean / worst of each of
    the RATIOS per NFE."""
    pairs = "; ".join(f"{a} / {b}" for a, b in SHOWN)
    head = "| problem | " + " | ".join(f"NFE {m}: {pairs}" for m in nfes) + " |"
    lines = [head, "|---|" + "---|" * len(nfes)]
    for name, res in zip(names, results, strict=True):
        cells = ["; ".join(f"{res[a][m]:.2e} / {res[b][m]:.2e}" for a, b in SHOWN)
                 for m in nfes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio (median, geometric mean, worst) | "
              + " | ".join(f"NFE {m}" for m in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for a, b in RATIOS:
        cells = []
        for m in nfes:
            r = np.array([res[a][m] / res[b][m] for res in results])
            cells.append(f"{np.median(r):.2f}, {np.exp(np.log(r).mean()):.2f}, {r.max():.2f}")
        lines.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-bases", type=int, nargs="+",
                        default=[25000, 26000, 27000, 28000],
                        help="sampler_family seed ranges whose held-out problems to run")
    parser.add_argument("--problems", type=int, default=24, help="problems per range")
    parser.add_argument("--draws", type=int, default=256, help="noise draws per problem")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--readme", action="store_true", help="write benchmarks/README.md")
    args = parser.parse_args()
    if args.draws < 1 or args.problems < 2 or min(args.nfe) < 2:
        raise SystemExit("--draws must be >= 1, --problems >= 2 and every --nfe >= 2")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    problems = [draw_problem(b + i) for b in args.seed_bases for i in range(1, args.problems, 2)]
    results = [errors(p, args.draws, args.nfe, 5000 + k) for k, p in enumerate(problems)]
    seconds = time.perf_counter() - t0
    text = (f"{len(problems)} held-out problems (seed ranges "
            f"{', '.join(map(str, args.seed_bases))}), {args.draws} draws each, default "
            f"(trailing) grids; {seconds:.0f} s on 1 thread.\n\n"
            + tables([p.name for p in problems], results, args.nfe))
    print(text)
    if args.readme:
        intro = ("`OMP_NUM_THREADS=1 python benchmarks/local_gaussian.py --readme` (the "
                 "script's docstring has the setup). RMS error to each problem's own PF-ODE "
                 "solution; each local-Gaussian sampler against itself with u = 0 "
                 "(`local_gaussian` is `dpmpp_2m` there, `local_unipc` `unipc_bh2`).\n\n")
        path = write_section(Path(__file__).with_name("README.md"), HEADING, intro + text,
                             INDEX_ROW, "local_gaussian.py")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
