"""Pluggable feature extractors: images in [-1, 1] -> (features, class probabilities).

An extractor is any object with a ``name`` (reported next to every metric) and a call
``extractor(images [B, C, H, W] in [-1, 1]) -> (features [B, D], logits [B, K] or None)``.
Two ship with difflab: the FID InceptionV3 (``inception:PATH``) and the small trained
classifier (``classifier:PATH``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..data import from_uint8
from .classifier import load_classifier
from .inception import load_fid_inception


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...


@dataclass
class ModuleExtractor:
    """Wraps a module returning (features, logits) and names it."""

    module: nn.Module
    name: str
    device: str | torch.device = "cpu"

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.module(images.to(self.device))


def load_extractor(spec: str, device: str | torch.device = "cpu") -> ModuleExtractor:
    """``inception:PATH`` (FID InceptionV3 weights) or ``classifier:PATH`` (a classifier saved
    by :func:`difflab.evaluation.classifier.save_classifier`)."""
    kind, _, path = spec.partition(":")
    if kind == "inception" and path:
        return ModuleExtractor(load_fid_inception(path, device), f"inception-v3-fid "
                               f"({Path(path).name})", device)
    if kind == "classifier" and path:
        model, _ = load_classifier(path)
        return ModuleExtractor(model.to(device), f"classifier ({Path(path).name})", device)
    raise ValueError(f"unknown --features {spec!r}: use inception:PATH or classifier:PATH")


@dataclass
class Extracted:
    features: np.ndarray            # [N, D] float64
    probs: np.ndarray | None        # [N, K] softmax of the logits, or None


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: Tensor | np.ndarray,
            batch_size: int = 200) -> Extracted:
    """Run ``extractor`` over images given as uint8 NHWC (as in ``--save-npz`` files) or as
    float [-1, 1] NCHW tensors; returns float64 features and class probabilities."""
    feats, probs = [], []
    n = images.shape[0]
    for s in range(0, n, batch_size):
        x = images[s:s + batch_size]
        if isinstance(x, np.ndarray) or x.dtype == torch.uint8:
            x = from_uint8(torch.as_tensor(np.ascontiguousarray(x))).permute(0, 3, 1, 2)
        f, logits = extractor(x)
        feats.append(f.double().cpu())
        if logits is not None:
            probs.append(torch.softmax(logits.double(), 1).cpu())
    return Extracted(torch.cat(feats).numpy(), torch.cat(probs).numpy() if probs else None)


__all__ = ["Extracted", "FeatureExtractor", "ModuleExtractor", "extract", "load_extractor"]
