"""Sinusoidal embeddings of the noise-conditioning input.

The denoisers are conditioned on a scalar per sample ("c_noise": a DDPM timestep in
[0, 1000), or a transformed noise level such as ``0.25 * log(sigma)``).  It is lifted to a
vector with the fixed sinusoidal features of the Transformer (Vaswani et al. 2017), used
for diffusion timesteps by Ho et al. 2020 ("Denoising Diffusion Probabilistic Models").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["broadcast_c_noise", "resolve_labels", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a batch of (float) noise-conditioning values.

    Feature ``i < dim // 2`` is ``cos(t * f_i)`` and feature ``dim // 2 + i`` is
    ``sin(t * f_i)`` with geometrically spaced frequencies
    ``f_i = max_period ** (-i / (dim // 2))``, from 1 down to about ``1 / max_period``.
    An odd ``dim`` gets one trailing zero column.

    Args:
        t: ``[B]`` conditioning values (any real dtype; computed in float32).
        dim: embedding width, ``>= 2``.
        max_period: the slowest period; controls the lowest frequency.

    Returns:
        ``[B, dim]`` float32 tensor on ``t``'s device.
    """
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor [B], got shape {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    half = dim // 2
    # f_i = exp(-log(max_period) * i / half), i = 0..half-1          [half]
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2 * half]
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))  # [B, dim]
    return emb


def broadcast_c_noise(c_noise: Tensor, batch: int) -> Tensor:
    """Return ``c_noise`` as shape ``[batch]``, broadcasting a 0-d tensor."""
    if c_noise.ndim == 0:
        return c_noise.expand(batch)
    if c_noise.shape != (batch,):
        raise ValueError(f"c_noise must have shape [{batch}] or [], got {tuple(c_noise.shape)}")
    return c_noise


def resolve_labels(
    labels: Tensor | None, batch: int, num_classes: int, device: torch.device,
    check_range: bool = True,
) -> Tensor:
    """Validate class labels for an embedding with a reserved null row.

    Valid labels are ``0..num_classes - 1`` (classes) and ``num_classes`` (the null label
    of classifier-free guidance, Ho & Salimans 2022).  ``None`` means "all null".

    ``check_range=False`` skips the range check (it waits for the device), for labels
    known to be valid, such as a data set's in the training loop.

    Returns:
        ``[batch]`` long tensor.

    Raises:
        ValueError: wrong shape or dtype, or a label outside ``[0, num_classes]``.
    """
    if labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    # The range check syncs with the device; skip it while tracing for torch.compile.
    check = batch and check_range and not torch.compiler.is_compiling()
    if check and bool(((labels < 0) | (labels > num_classes)).any()):
        raise ValueError(
            f"labels must be in [0, {num_classes}] (0..{num_classes - 1} are classes, "
            f"{num_classes} is the null label); got min={int(labels.min())}, "
            f"max={int(labels.max())}"
        )
    return labels.long()
