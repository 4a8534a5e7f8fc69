"""Where difflab and diffusers part on the cosine schedule: diffusers' float32 arithmetic at
the top level (the sampler_family namesake cells of unipc_bh1 on cosine problems).

    OMP_NUM_THREADS=1 python benchmarks/diffusers_top_level.py      # prints markdown tables

At the discrete cosine schedule's last level, sigma~ = 2.0e4, the variance-preserving sigma is
1 - 1.2e-9, which float32 cannot hold; diffusers' x0_hat = (x - sigma eps_hat) / alpha divides
that rounding by alpha = 4.9e-5. The first table gives those numbers; the second the distance of
each library's first step (DDIM out of the top level, the UniPC bh1 run of ``sampler_family``)
from the exact DDIM step, and how far the two finished runs are apart, on the sampler_family
problem 17003 (cosine, a single Gaussian) and, for contrast, on a linear-schedule problem.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from sampler_family import (  # noqa: E402
    TableModel,
    draw_problem,
    family_schedulers,
    noise,
    quiet_diffusers,
    vp_state,
)
from samplers import ve_scale  # noqa: E402

from difflab.samplers import unipc_bh1  # noqa: E402

LABEL = "UniPC bh1 (3) trailing"


def scheduler(problem, steps: int):
    abar = 1 / (1 + problem.sigmas**2)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    cls, cfg = family_schedulers()[LABEL]
    sched = cls(num_train_timesteps=1000, **cfg, trained_betas=betas.tolist())
    sched.set_timesteps(steps)
    return sched


def top_level_rounding(problem) -> tuple[float, float, float]:
    """(VP sigma at the top level in float64, in float32 as diffusers computes it from its
    table's sigma~ (alpha = 1 / sqrt(sigma~^2 + 1), sigma = sigma~ alpha), x0_hat error per
    unit eps_hat that the difference makes)."""
    s32 = scheduler(problem, 10).sigmas[0]
    sig32 = float(s32 * (1 / (s32**2 + 1) ** 0.5))
    s64 = float(problem.sigmas[-1])
    a64 = 1 / math.sqrt(1 + s64 * s64)
    sig64 = s64 * a64
    return sig64, sig32, abs(sig32 - sig64) / a64


def runs(problem, steps: int, draws: int = 256, seed: int = 5001) -> tuple[float, ...]:
    """(max |first step - exact DDIM| for diffusers and for difflab, in y = x / alpha at the
    second level; max |diffusers - difflab| of the finished runs)."""
    proc = problem.process
    x_T = noise(problem, draws, seed) * float(proc.sigma(proc.t_max))
    sched = scheduler(problem, steps)
    model = TableModel(problem)
    x = vp_state(problem, x_T) * ve_scale(sched)
    first = None
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), float(t) + 1.0).eps, t, x).prev_sample
        first = x.double() if first is None else first
    ts = problem.default_grid(steps)
    ts = torch.cat([ts[:-1], problem.times[:1]])
    st = (-0.5 * proc.log_snr(ts)).exp()
    pred = problem.data(x_T, ts[0])
    exact = pred.x0 + st[1] * pred.eps
    states: list[torch.Tensor] = []
    ours = unipc_bh1(problem.data, x_T, ts, callback=lambda info: states.append(info.x),
                     noisy_end=True)
    theirs_y = first * math.sqrt(1 + float(st[1]) ** 2)
    ours_y = states[0] / float(proc.alpha(ts[1]))
    return (float((theirs_y - exact).abs().max()), float((ours_y - exact).abs().max()),
            float((x.double() - ours).abs().max()))


def main() -> None:
    torch.set_num_threads(1)
    quiet_diffusers()
    cosine, linear = draw_problem(17003), draw_problem(17001)
    sig64, sig32, per_eps = top_level_rounding(cosine)
    print(f"### Top level of {cosine.name} (sigma~ = {float(cosine.sigmas[-1]):.4g})\n")
    print("| VP sigma, float64 | as float32 | x0_hat error per unit eps_hat |\n|---|---|---|")
    print(f"| {sig64!r} | {sig32!r} | {per_eps:.3g} |\n")
    print("### First step and finished runs (UniPC bh1, diffusers' sigma_min end)\n")
    print("| problem | NFE | diffusers' first step - exact DDIM | difflab's | "
          "diffusers - difflab at the end |\n|---|---|---|---|---|")
    for p in (cosine, linear):
        for steps in (10, 20):
            d, o, end = runs(p, steps)
            print(f"| {p.name} | {steps} | {d:.2e} | {o:.2e} | {end:.2e} |")


if __name__ == "__main__":
    main()
