"""Bits/dim of a model on a set of 8-bit images, by the variational bound or the ODE."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from .likelihood import vlb, vlb_steps
from .ode_likelihood import bits_per_dim_dequantized, dequantize, ode_nll


def model_bits_per_dim(denoiser: Any, images: torch.Tensor, labels: torch.Tensor | None,
                       method: Literal["vlb", "ode"], batch_size: int = 256, seed: int = 0,
                       device: str | torch.device = "cpu", **options: Any) -> dict[str, Any]:
    """Mean bits/dim (and its standard error) of images [N, C, H, W] on the 8-bit grid of
    [-1, 1]: the VLB with the discretized decoder (Ho et al. 2020, eq. 13), or the
    likelihood of the uniformly dequantized images under the probability-flow ODE (Song et
    al. 2021, app. D.2). ``options`` go to :func:`vlb` or :func:`ode_nll`; one generator
    seeded with ``seed`` drives the stratified terms, the dequantization and the probes.
    For progress, wrap ``denoiser`` (e.g. ``difflab.cli.progress.ProgressDenoiser``): the VLB
    makes :func:`vlb_evaluations` calls of it."""
    g = torch.Generator().manual_seed(seed)
    per, extra = [], {}
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device)
        y = None if labels is None else labels[s:s + batch_size].to(device)
        if method == "vlb":
            r = vlb(denoiser, x, y, generator=g, **options)
            per.append(r.bits_per_dim.cpu())
        else:
            r = ode_nll(denoiser, dequantize(x, g), y, generator=g, **options)
            per.append(bits_per_dim_dequantized(r.nll, r.dims))
            extra["nfe"] = extra.get("nfe", 0) + r.nfe
    bpd = torch.cat(per).double()
    return {"bits_per_dim": float(bpd.mean()), "stderr": float(bpd.std() / len(bpd) ** 0.5)
            if len(bpd) > 1 else None, "n": len(bpd), **extra}


def vlb_evaluations(T: int, n: int, batch_size: int, steps: int | None = None) -> int:
    """Network evaluations of :func:`model_bits_per_dim` by the VLB on ``n`` images: per batch,
    one per KL term evaluated (:func:`vlb_steps`) and one for the decoder term L_0."""
    terms = len(vlb_steps(T, steps, torch.Generator())[0])  # the count needs no draw
    return math.ceil(n / batch_size) * (terms + 1)
