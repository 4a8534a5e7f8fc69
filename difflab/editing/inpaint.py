"""Inpainting with an unconditional or conditional model: replacement and RePaint.

At every reverse step the known region is replaced by the input noised to the new time,
x_s = m * x_s(model) + (1 - m) * q(x_s | x_known), with mask m = 1 where pixels are
regenerated (the "replacement" method, Song et al. 2021, appendix I). RePaint (Lugmayr et al.
2022) adds resampling: after every ``jump_length`` reverse steps it goes back up that many
steps with the forward transitions q(x_t | x_s) and repeats the way down, ``jump_n_sample``
times in all, which lets the generated part harmonise with the known one. The output's known
region is the input exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from ..process import q_sample, q_step
from ..samplers.ancestral import posterior_step, posterior_variances
from ..samplers.base import Callback, Generators, check_grid, randn_like, report


def repaint_path(n: int, jump_length: int = 0, jump_n_sample: int = 1) -> list[int]:
    """Grid indices visited, 0 (t_max) .. n (t_min): +1 is a reverse step, -1 a forward one.

    With jump_length = 0 or jump_n_sample = 1 the path is 0, 1, ..., n (no resampling).
    """
    if jump_length < 0 or jump_n_sample < 1:
        raise ValueError("need jump_length >= 0 and jump_n_sample >= 1")
    jumps = {j: jump_n_sample - 1 for j in range(jump_length, n, jump_length)} \
        if jump_length > 0 else {}
    path, i = [0], 0
    while i < n:
        i += 1
        path.append(i)
        if jumps.get(i, 0) > 0:
            jumps[i] -= 1
            path.extend(range(i - 1, i - jump_length - 1, -1))
            i -= jump_length
    return path


@torch.no_grad()
def inpaint(denoiser: DenoiserFn, x_known: Tensor, mask: Tensor, ts: Tensor,
            generator: Generators = None, callback: Callback | None = None, *,
            cond: Any = None, eta: float = 1.0, jump_length: int = 0,
            jump_n_sample: int = 1) -> Tensor:
    """Fill the region where ``mask`` is 1 (broadcastable to x_known, values 0/1), keeping
    the rest of ``x_known`` exactly. Reverse steps are DDIM(eta) (eta = 1: DDPM, as RePaint);
    starts from pure noise at ts[0]; ``jump_*`` as in ``repaint_path``."""
    ts = check_grid(ts)
    mask = (mask > 0.5).to(x_known.dtype)
    process = denoiser.process
    a, sig, _, beta_tilde = posterior_variances(process, ts)
    c2 = eta**2 * beta_tilde
    n = len(ts) - 1
    x = process.sigma(ts[0]).to(x_known.dtype) * randn_like(x_known, generator)
    path = repaint_path(n, jump_length, jump_n_sample)
    for step, (i, j) in enumerate(zip(path[:-1], path[1:], strict=True)):
        if j < i:  # forward jump t_j > t_i: x_{t_j} ~ q(x_{t_j} | x_{t_i})
            x = q_step(process, x, ts[i], ts[j], randn_like(x, generator))
            continue
        pred = denoiser(x, ts[i], cond)
        if j == n:
            gen = pred.x0
            known = x_known
        else:
            gen = posterior_step(pred, x, a[j], sig[j], c2[i], c2[i], generator)
            known = q_sample(process, x_known, ts[j], randn_like(x_known, generator))
        x = torch.where(mask.bool(), gen, known)  # exact copy of the known region
        report(callback, step, ts[i], x, pred)
    return x
