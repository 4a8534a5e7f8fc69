"""Drawing many samples: batching, one RNG per seed, progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..parameterization import DenoiserFn
from .base import check_grid
from .grids import Spacing, time_grid


def seed_generators(seeds: Sequence[int], device: torch.device | str = "cpu"
                    ) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def generate(denoiser: DenoiserFn, sampler, shape: Sequence[int], seeds: Sequence[int], *,
             labels: Tensor | None = None, steps: int = 50, spacing: Spacing | None = None,
             batch_size: int = 256, device: torch.device | str = "cpu",
             progress: bool = True, ts: Tensor | None = None, **options: Any) -> Tensor:
    """Sample one image of ``shape`` per seed with ``sampler`` on ``steps`` steps.

    Image i uses ``torch.Generator().manual_seed(seeds[i])`` for its initial noise and for
    every stochastic step, so it is the same whatever the batch size or the set of other seeds
    (the basis of reproducible and sharded sampling). ``labels`` [n] go to the denoiser as
    ``cond``. A given grid ``ts`` (e.g. a fitted one from ``load_time_grid``) replaces ``steps``
    and ``spacing``; the initial noise is at its first time. Returns a CPU float32 tensor
    [n, *shape].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be at least 1, got {batch_size}")
    if len(seeds) == 0:
        raise ValueError("no images to draw: the number of images (--n) must be at least 1")
    process = denoiser.process
    ts = time_grid(process, steps, spacing) if ts is None else check_grid(ts)
    sigma_max = float(process.sigma(ts[0]))
    out = []
    bar = tqdm(total=len(seeds), desc="sampling", unit="img", disable=not progress)
    for start in range(0, len(seeds), batch_size):
        gens = seed_generators(seeds[start:start + batch_size], device)
        x = sigma_max * torch.stack([torch.randn(tuple(shape), generator=g, device=device)
                                     for g in gens])
        cond = None if labels is None else labels[start:start + batch_size].to(device)
        x = sampler(denoiser, x, ts, gens, cond=cond, **options)
        out.append(x.float().cpu())
        bar.update(len(gens))
    bar.close()
    return torch.cat(out)
