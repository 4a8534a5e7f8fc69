"""What ``pipe(...)`` returns: the samples as a tensor, as uint8 images, and as files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import from_uint8, save_grid, save_scatter, to_uint8
from ..io import atomic_write


@dataclass
class PipelineOutput:
    """Samples of a pipeline.

    ``samples``: float32 CPU tensor [n, *sample_shape] in the data range ([-1, 1] for images);
    ``labels``: class index per image (None for unconditional and text models); ``prompts``:
    prompt per image (text models); ``seeds``: seed of each image; ``nrow``: images per row of
    the grid (one row per class or prompt).
    """

    samples: Tensor
    seeds: list[int]
    nrow: int
    labels: Tensor | None = None
    prompts: list[str] | None = None

    @property
    def is_image(self) -> bool:
        return self.samples.ndim == 4

    @property
    def images(self) -> np.ndarray | None:
        """uint8 [n, H, W, C] images (the 8-bit grid of [-1, 1]); None for 2-D points."""
        if not self.is_image:
            return None
        return to_uint8(self.samples).permute(0, 2, 3, 1).numpy()

    def save_grid(self, path: str | Path) -> Path:
        """A PNG grid of the 8-bit images, ``nrow`` per row, upscaled to at least 64 pixels
        (or a scatter plot of 2-D points)."""
        if not self.is_image:
            return save_scatter(self.samples, path)
        x = from_uint8(to_uint8(self.samples))
        return save_grid(x, path, nrow=self.nrow, scale=max(1, 64 // x.shape[-1]))

    def save_npz(self, path: str | Path) -> Path:
        """``images`` (uint8 NHWC, or float points [n, D]), ``labels`` (-1 where none) and
        ``seeds``, as ``difflab eval`` reads them."""
        n = len(self.samples)
        labels = self.labels if self.labels is not None else torch.full((n,), -1)
        arrays = {"images": self.images if self.is_image else self.samples.numpy(),
                  "labels": labels.numpy(), "seeds": np.asarray(self.seeds, dtype=np.int64)}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        return atomic_write(Path(path), write)
