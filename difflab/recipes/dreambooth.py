"""DreamBooth's prior preservation (Ruiz et al. 2023, sec. 4.2): class images the base model
generates once, and batches that pair instance images with class images.

The class-specific prior-preservation loss (eq. 2) is
E[w_t ||x_hat(alpha_t x + sigma_t eps, c) - x||^2 + lambda w_t' ||x_hat(alpha_t' x_pr +
sigma_t' eps', c_pr) - x_pr||^2], where x_pr are samples of the *frozen* base model for the
class prompt c_pr; fine-tuning on them alongside the instance images keeps the model from
forgetting the class (language drift) while it learns the subject. The class images are
generated once, before training, and cached in the run folder, so a resumed run reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..data import Batch, EpochSource
from ..io import atomic_write, read_safetensors
from ..pipeline import Pipeline

__all__ = ["CLASS_IMAGES_FILE", "PairedBatch", "PairedSource", "class_images"]

#: the cache of generated class images inside the run folder
CLASS_IMAGES_FILE = "class_images.safetensors"


def class_images(pipe: Pipeline, out_dir: Path, n: int, steps: int, seed: int,
                 prompt: str | None = None, label: int | None = None) -> Tensor:
    """``n`` samples of ``pipe`` for the class ``prompt`` (text models) or class ``label``
    (class models), with its default sampler and ``steps`` steps, image i from seed
    ``seed + i``. Read from ``out_dir/class_images.safetensors`` when it holds the same
    request; otherwise generated and written there."""
    file = out_dir / CLASS_IMAGES_FILE
    request = {"prompt": prompt or "", "label": "" if label is None else str(label),
               "n": str(n), "steps": str(steps), "seed": str(seed),
               "shape": str(list(pipe.sample_shape))}
    cached = _read_cache(file, request)
    if cached is not None:
        return cached
    cond = (pipe.condition(None, prompt=[prompt], n=n) if prompt is not None
            else pipe.condition([label] * n))
    x = pipe(cond=cond, steps=steps, seed=seed).samples.float().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda tmp: save_file({"images": x.contiguous()}, tmp,
                                             metadata=request))
    return x


def _read_cache(file: Path, request: dict[str, str]) -> Tensor | None:
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    if meta != request:
        return None
    return read_safetensors(file)["images"]


@dataclass
class PairedBatch:
    """A step's instance batch and (with prior preservation) its class batch."""

    instance: Batch
    prior: Batch | None = None

    def __len__(self) -> int:
        return len(self.instance)


@dataclass
class PairedSource:
    """Instance batches and, when ``prior`` is given, class batches of the same step (both
    epoch-wise shuffled, stateless in the step: a resumed run needs no loader state)."""

    instance: EpochSource
    prior: EpochSource | None = None

    @property
    def x(self) -> Tensor:
        return self.instance.x

    def batch(self, step: int, generator: Any = None) -> PairedBatch:
        return PairedBatch(self.instance.batch(step),
                           None if self.prior is None else self.prior.batch(step))


def label_tensor(index: int, n: int, device: torch.device | str) -> Tensor:
    """``[n]`` copies of one label."""
    return torch.full((n,), index, dtype=torch.long, device=device)
