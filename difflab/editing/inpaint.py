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

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..data import DataError, load_png
from ..parameterization import DenoiserFn
from ..process import q_sample, q_step
from ..samplers.ancestral import posterior_step, posterior_variances
from ..samplers.base import Callback, Generators, check_grid, randn_like, report


def repaint_path(n: int, jump_length: int = 0, jump_n_sample: int = 1) -> list[int]:
    """Grid indices visited, 0 (t_max) .. n (t_min): +1 is a reverse step, -1 a forward one.

    With jump_length = 0 or jump_n_sample = 1 the path is 0, 1, ..., n (no resampling).
    """
    if jump_length < 0 or jump_n_sample < 1:
        raise ValueError(f"need jump_length (--jump-length) >= 0 and jump_n_sample "
                         f"(--jump-n-sample) >= 1, got {jump_length} and {jump_n_sample}")
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


def check_mask(mask: Tensor, x_known: Tensor) -> Tensor:
    """``mask`` as booleans, refused unless it holds only 0 and 1 and broadcasts to
    ``x_known``: a grey value would be rounded to keep or regenerate without a word."""
    mask = torch.as_tensor(mask)
    try:
        shape = torch.broadcast_shapes(mask.shape, x_known.shape)
    except RuntimeError:
        shape = None
    if shape != x_known.shape:
        raise ValueError(f"inpainting mask of shape {list(mask.shape)} does not fit the image "
                         f"{list(x_known.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("inpainting mask must hold only 0 (keep) and 1 (regenerate); it has "
                         f"{int(((mask != 0) & (mask != 1)).sum())} values in between")
    return mask.bool()


def load_mask(path: str | Path, image: str | Path, resolution: int) -> Tensor:
    """A black-and-white mask file (white = regenerate) for the image file ``image``: it must
    have the image's pixel size and only black (0) and white (255) pixels, and is resized and
    centre-cropped to ``resolution`` as the image is. Returns a 0/1 tensor [1, 1, R, R].

    Raises:
        DataError: the mask's size differs from the image's, or it has grey (or coloured)
            pixels; the message names the file."""
    sizes = []
    for p in (path, image):
        try:
            with Image.open(p) as img:
                sizes.append(img.size)
                if p is path:
                    rgb = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image file {p}: {e}") from None
    if sizes[0] != sizes[1]:
        raise DataError(f"mask {path} is {sizes[0][0]}x{sizes[0][1]} pixels but the image "
                        f"{image} is {sizes[1][0]}x{sizes[1][1]}: they must be the same size")
    black_or_white = ((rgb == 0) | (rgb == 255)).all(-1) & (rgb == rgb[..., :1]).all(-1)
    grey = int((~black_or_white).sum())
    if grey:
        raise DataError(f"mask {path} has {grey} grey or coloured pixels; use only black "
                        "(keep) and white (regenerate)")
    # bicubic resizing makes edges grey: threshold at mid-grey, as nearest would
    return (load_png(path, 1, resolution) > 0).float()[None]


def latent_mask(mask: Tensor, size: int) -> Tensor:
    """A 0/1 pixel mask [B, 1, H, W] (1 = regenerate) at a latent resolution ``size``: a
    latent cell is regenerated when any pixel it covers is (max-pooling), so the region kept
    from the input's latents never touches the part to regenerate. Identity at ``size`` =
    H."""
    if mask.shape[-1] == size:
        return mask
    return F.adaptive_max_pool2d(mask, size)


@torch.no_grad()
def inpaint(denoiser: DenoiserFn, x_known: Tensor, mask: Tensor, ts: Tensor,
            generator: Generators = None, callback: Callback | None = None, *,
            cond: Any = None, eta: float = 1.0, jump_length: int = 0,
            jump_n_sample: int = 1) -> Tensor:
    """Fill the region where ``mask`` is 1 (broadcastable to x_known, values 0/1), keeping
    the rest of ``x_known`` exactly. Reverse steps are DDIM(eta) (eta = 1: DDPM, as RePaint);
    starts from pure noise at ts[0]; ``jump_*`` as in ``repaint_path``."""
    ts = check_grid(ts)
    mask = check_mask(mask, x_known).to(x_known.dtype)
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
