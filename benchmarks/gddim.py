"""gDDIM on critically-damped Langevin diffusion against Euler and Heun on the same PF-ODE.

    OMP_NUM_THREADS=1 python benchmarks/gddim.py                  # 4 problems, seeds 7000..7003
    OMP_NUM_THREADS=1 python benchmarks/gddim.py --seeds 7000,7005 --samples 32

Each problem is an exact CLD Gaussian mixture (``analytic.CLDGaussianMixture``, the paper's
CLD settings beta = 4, M = 1/4, gamma = 0.04) drawn from its seed: K components in D
dimensions with random means, stds and weights. Noise u_T is drawn from the exact marginal at
t = 1 (its own generator); the reference is the probability-flow ODE solved by DOP853 at
rtol = atol = 1e-11 down to t_min = 1e-3. Every method runs on the same quadratic grid
(``quadratic_grid``) with the exact denoiser; the error is the RMS of the position x at t_min
against the reference, averaged over problems (geometric mean). NFE counts model evaluations:
gDDIM and Euler take one per step, Heun two (NFE // 2 steps, so odd budgets use one less).

Peers: diffusers has no CLD scheduler (its schedulers are for scalar alpha / sigma processes),
so the peer baselines are the generic ODE solvers on the PF-ODE du/dt = F u - G G^T score / 2.
CLD's own samplers (Euler-Maruyama and symmetric splitting, Dockhorn et al. 2022) solve the SDE
and are not compared to an ODE reference here.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from difflab.analytic import CLDGaussianMixture
from difflab.process.cld import CLD, quadratic_grid
from difflab.samplers.gddim import gddim

NFES = (5, 10, 20, 40)


def draw_problem(seed: int, k: int = 4, dim: int = 2) -> CLDGaussianMixture:
    """A CLD Gaussian mixture from its seed: means N(0, 1), stds U(0.1, 0.5), weights
    U(0.5, 1.5) normalised."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, dim, generator=g, dtype=torch.float64)
    std = 0.1 + 0.4 * torch.rand(k, dim, generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    return CLDGaussianMixture(CLD(), mu, std, w)


def pf_drift(model: CLDGaussianMixture, u: Tensor, t: Tensor) -> Tensor:
    """du/dt of the PF-ODE from one model evaluation (eps -> score at the boundary)."""
    process = model.process
    return process.pf_ode_drift(u, t, process.score_from_eps(model(u, t).eps, t))


def euler(model: CLDGaussianMixture, u: Tensor, ts: Tensor) -> Tensor:
    """Explicit Euler in t on the PF-ODE: u_{i+1} = u_i + (t_{i+1} - t_i) f(u_i, t_i)."""
    for i in range(len(ts) - 1):
        u = u + (ts[i + 1] - ts[i]) * pf_drift(model, u, ts[i])
    return u


def heun(model: CLDGaussianMixture, u: Tensor, ts: Tensor) -> Tensor:
    """Heun's method (explicit trapezoid) in t on the PF-ODE: two evaluations per step."""
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        d0 = pf_drift(model, u, ts[i])
        d1 = pf_drift(model, u + h * d0, ts[i + 1])
        u = u + 0.5 * h * (d0 + d1)
    return u


def methods() -> dict[str, tuple]:
    """Name -> (solver(model, u, ts), evaluations per step)."""
    out = {f"gDDIM q={q}": (lambda m, u, ts, q=q: gddim(m, u, ts, order=q), 1) for q in (0, 1, 2)}
    out["gDDIM q=2, K=L (Cholesky)"] = (
        lambda m, u, ts: gddim(m, u, ts, order=2, factor="cholesky"), 1)
    out["Euler (PF-ODE in t)"] = (euler, 1)
    out["Heun (PF-ODE in t)"] = (heun, 2)
    return out


def run(seeds: list[int], samples: int) -> tuple[dict[str, list[float]], float]:
    """Geometric-mean RMS per method and NFE over the problems; the reference solve time."""
    errs: dict[str, list[list[float]]] = {name: [[] for _ in NFES] for name in methods()}
    t_ref = 0.0
    for seed in seeds:
        model = draw_problem(seed)
        process = model.process
        u_t = model.sample_marginal(samples, process.t_max,
                                    torch.Generator().manual_seed(seed + 10_000))
        start = time.perf_counter()
        ref = model.ode_solution(u_t, process.t_max, process.t_min, rtol=1e-11, atol=1e-11)
        t_ref += time.perf_counter() - start
        for name, (solve, per_step) in methods().items():
            for j, nfe in enumerate(NFES):
                out = solve(model, u_t, quadratic_grid(process, max(nfe // per_step, 1)))
                err = (out[:, 0] - ref[:, 0]).pow(2).mean().sqrt().item()
                errs[name][j].append(err if math.isfinite(err) else math.inf)
    geo = {name: [math.exp(sum(math.log(max(e, 1e-300)) for e in col) / len(col))
                  for col in cols] for name, cols in errs.items()}
    return geo, t_ref


def table(geo: dict[str, list[float]]) -> str:
    """The markdown table: one row per method, RMS of x at t_min per NFE."""
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|" + "---:|" * len(NFES)]
    for name, row in geo.items():
        cells = " | ".join("diverged" if not math.isfinite(e) or e > 1e6 else f"{e:.2e}"
                           for e in row)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="7000,7001,7002,7003",
                        help="comma-separated problem seeds (held out: no test uses them)")
    parser.add_argument("--samples", type=int, default=64, help="noise draws per problem")
    parser.add_argument("--readme", action="store_true", help="also write benchmarks/README.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    geo, t_ref = run(seeds, args.samples)
    text = (f"CLD (beta=4, M=1/4, gamma=0.04), {len(seeds)} mixture problems (seeds "
            f"{args.seeds}), {args.samples} draws each; RMS of x at t_min = 1e-3 vs DOP853 "
            f"(geometric mean over problems); quadratic time grid\n\n{table(geo)}\n\n"
            f"{time.perf_counter() - start:.1f} s in all ({t_ref:.1f} s reference solves) on "
            f"{torch.get_num_threads()} thread(s).")
    print(text)
    if args.readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from readme_section import write_section

        intro = ("`OMP_NUM_THREADS=1 python benchmarks/gddim.py --readme` (the script's "
                 "docstring has the problems; diffusers has no CLD scheduler, so the baselines "
                 "are Euler and Heun on the same probability-flow ODE, docs/gddim.md).\n\n")
        path = write_section(Path(__file__).with_name("README.md"), HEADING, intro + text,
                             INDEX_ROW, "gddim.py")
        print(f"wrote {path}")


HEADING = "gDDIM on critically-damped Langevin diffusion (`benchmarks/gddim.py`)"
INDEX_ROW = ("| `OMP_NUM_THREADS=1 python benchmarks/gddim.py` | gDDIM (orders 0-2, R_t and "
             "Cholesky parameterisations) against Euler and Heun on exact CLD mixtures | "
             "[gDDIM on CLD](#gddim-on-critically-damped-langevin-diffusion-benchmarksgddimpy) |")


if __name__ == "__main__":
    main()
