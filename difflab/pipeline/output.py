"""What ``pipe(...)`` returns: the samples as a tensor, as uint8 images, and as files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import from_uint8, save_grid, save_labelled_grid, save_scatter, to_uint8
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

    def save_grid(self, path: str | Path, *, caption: str | None = None,
                  class_names: list[str] | None = None, labelled: bool = False) -> Path:
        """A PNG grid of the 8-bit images, ``nrow`` per row, upscaled to at least 64 pixels
        (or a scatter plot of 2-D points). ``labelled``: with :meth:`row_labels` (class names
        from ``class_names``) in a left margin and ``caption`` below; the image cells stay
        pixel-identical to the unlabelled grid's."""
        if not self.is_image:
            return save_scatter(self.samples, path)
        x = from_uint8(to_uint8(self.samples))
        scale = max(1, 64 // x.shape[-1])
        if not labelled:
            return save_grid(x, path, nrow=self.nrow, scale=scale)
        return save_labelled_grid(x, path, nrow=self.nrow, scale=scale, caption=caption,
                                  row_labels=self.row_labels(class_names))

    def row_labels(self, class_names: list[str] | None = None) -> list[str] | None:
        """The prompt or class (name, else index) of each grid row, when every image of
        each row shares one; else None."""
        rows = [range(s, min(s + self.nrow, len(self.seeds)))
                for s in range(0, len(self.seeds), self.nrow)]
        if self.prompts is not None:
            keys = [{self.prompts[i] for i in row} for row in rows]
            return [repr(k.pop()) for k in keys] if all(len(k) == 1 for k in keys) else None
        if self.labels is None:
            return None
        keys = [{int(self.labels[i]) for i in row} for row in rows]
        if not all(len(k) == 1 for k in keys):
            return None
        names = class_names or []
        return [names[k] if 0 <= k < len(names) else str(k)
                for k in (k.pop() for k in keys)]

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
