"""DPM-Solver-v3 with statistics against DPM-Solver++ and UniPC on held-out family problems.

    OMP_NUM_THREADS=1 python benchmarks/dpm_solver_v3.py                 # 6 problems
    OMP_NUM_THREADS=1 python benchmarks/dpm_solver_v3.py --problems 1,3  # given indices

Problems are ``sampler_family.draw_problem(1000 + i)`` for odd i (the family's held-out ones).
For each, the EMS statistics are estimated from fresh data draws (``--stat-draws``, their own
seed) at ``--knots`` lambdas from lambda(t_max) to the table's first level; the errors are
RMS to the DOP853 reference of the PF-ODE from other noise draws. Grids: the family's
default (trailing pick of the 1000-level table) and log-SNR (the paper's grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from difflab.samplers import (
    CountingDenoiser,
    dpm_solver_v3,
    dpmpp_2m,
    dpmpp_3m,
    ems_lambdas,
    ems_statistics,
    reference_solution,
    time_grid,
    unipc_bh1,
    unipc_bh2,
)

sys.path.insert(0, str(Path(__file__).parent))
from sampler_family import draw_problem, noise, rms, sigma_min  # noqa: E402

NFES = (5, 8, 10)
BASELINES = {"dpmpp_2m": (dpmpp_2m, {}), "dpmpp_3m": (dpmpp_3m, {}),
             "unipc_bh1 (3)": (unipc_bh1, {}), "unipc_bh2 (2)": (unipc_bh2, {}),
             "dpmpp_3m f3": (dpmpp_3m, {"final_order": 3}),
             "unipc_bh1 f3": (unipc_bh1, {"final_order": 3}),
             "unipc_bh2 f3": (unipc_bh2, {"final_order": 3})}
V3 = {"v3 no stats": {}, "v3": {"stats": True},
      "v3 pseudo": {"stats": True, "predictor_pseudo": True},
      "v3 f3": {"stats": True, "final_order": 3},
      "v3 no stats f3": {"final_order": 3}}


def grid(problem, name: str, n: int) -> torch.Tensor:
    if name == "default":
        return problem.default_grid(n)
    return time_grid(problem.process, n, "logsnr", sigma_min=sigma_min(problem))


def errors(problem, seed: int, draws: int, stat_draws: int, knots: int, tol: float) -> dict:
    proc = problem.process
    x_T = noise(problem, draws, seed) * float(proc.sigma(proc.t_max))
    ref = reference_solution(problem.data, x_T, tol)
    g = torch.Generator().manual_seed(seed + 7)
    t0 = time.perf_counter()
    stats = ems_statistics(problem.data, problem.data.sample(stat_draws, g),
                           ems_lambdas(proc, knots, sigma_min(problem)), generator=g)
    stat_s = time.perf_counter() - t0
    out: dict[str, dict] = {}
    for gname in ("default", "logsnr"):
        for label, (fn, opts) in BASELINES.items():
            out[f"{label} [{gname}]"] = {m: _run(problem, fn, grid(problem, gname, m), x_T,
                                                 ref, m, opts) for m in NFES}
        for label, cfg in V3.items():
            opts = {k: v for k, v in cfg.items() if k != "stats"}
            if cfg.get("stats"):
                opts["statistics"] = stats
            out[f"{label} [{gname}]"] = {m: _run(problem, dpm_solver_v3, grid(problem, gname, m),
                                                 x_T, ref, m, opts) for m in NFES}
    return {"errors": out, "stat_seconds": stat_s}


def _run(problem, fn, ts, x_T, ref, m, opts) -> float:
    counted = CountingDenoiser(problem.data)
    x = fn(counted, x_T, ts, **opts)
    assert counted.nfe == m, (fn.__name__, counted.nfe, m)
    return rms(x, ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="1,3,5,7,9,11",
                        help="odd indices i of draw_problem(1000 + i)")
    parser.add_argument("--draws", type=int, default=128, help="evaluation noise draws")
    parser.add_argument("--stat-draws", type=int, default=512, help="data draws for EMS")
    parser.add_argument("--knots", type=int, default=64, help="lambda knots of the EMS")
    parser.add_argument("--tol", type=float, default=1e-9, help="reference tolerance")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for i in (int(s) for s in args.problems.split(",")):
        p = draw_problem(1000 + i)
        t0 = time.perf_counter()
        res = errors(p, 5000 + i, args.draws, args.stat_draws, args.knots, args.tol)
        rows.append((p.name, res["errors"]))
        print(f"## {i}: {p.name} ({time.perf_counter() - t0:.0f} s, statistics "
              f"{res['stat_seconds']:.1f} s)")
        print("| sampler [grid] | " + " | ".join(f"NFE {m}" for m in NFES) + " |")
        print("|---|" + "---|" * len(NFES))
        for label, row in res["errors"].items():
            print(f"| {label} | " + " | ".join(f"{row[m]:.3g}" for m in NFES) + " |")
        sys.stdout.flush()
    print(summary(rows))


def summary(rows) -> str:
    """Median (worst) over problems of v3 with statistics / each baseline, same grid and
    last step (x0_hat, or final_order=3: "f3")."""
    lines = ["| ratio (median, worst) | grid | " + " | ".join(f"NFE {m}" for m in NFES) + " |",
             "|---|---|" + "---|" * len(NFES)]
    pairs = [("v3", b) for b in ("dpmpp_2m", "dpmpp_3m", "unipc_bh1 (3)", "unipc_bh2 (2)",
                                 "v3 no stats")]
    pairs += [("v3 f3", b) for b in ("dpmpp_3m f3", "unipc_bh1 f3", "unipc_bh2 f3",
                                     "v3 no stats f3")]
    for gname in ("default", "logsnr"):
        for ours, base in pairs:
            cells = []
            for m in NFES:
                r = np.array([errs[f"{ours} [{gname}]"][m] / errs[f"{base} [{gname}]"][m]
                              for _, errs in rows])
                cells.append(f"{np.median(r):.2f} ({r.max():.2f})")
            lines.append(f"| {ours} / {base} | {gname} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
