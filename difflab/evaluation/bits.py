"""Bits/dim of a model on a set of 8-bit images, by the variational bound or the ODE."""

from __future__ import annotations

from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .likelihood import vlb
from .ode_likelihood import bits_per_dim_dequantized, dequantize, ode_nll


def model_bits_per_dim(denoiser: Any, images: torch.Tensor, labels: torch.Tensor | None,
                       method: Literal["vlb", "ode"], batch_size: int = 256, seed: int = 0,
                       device: str | torch.device = "cpu", progress: bool = False,
                       **options: Any) -> dict[str, Any]:
    """Mean bits/dim (and its standard error) of images [N, C, H, W] on the 8-bit grid of
    [-1, 1]: the VLB with the discretized decoder (Ho et al. 2020, eq. 13), or the
    likelihood of the uniformly dequantized images under the probability-flow ODE (Song et
    al. 2021, app. D.2). ``options`` go to :func:`vlb` or :func:`ode_nll`; one generator
    seeded with ``seed`` drives the stratified terms, the dequantization and the probes.
    ``progress``: a tqdm bar of the images scored (on stderr)."""
    g = torch.Generator().manual_seed(seed)
    per, extra = [], {}
    bar = tqdm(total=len(images), desc=f"nll ({method})", unit="img", disable=not progress)
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
        bar.update(len(x))
    bar.close()
    bpd = torch.cat(per).double()
    return {"bits_per_dim": float(bpd.mean()), "stderr": float(bpd.std() / len(bpd) ** 0.5)
            if len(bpd) > 1 else None, "n": len(bpd), **extra}
