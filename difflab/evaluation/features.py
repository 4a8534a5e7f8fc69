"""Pluggable feature extractors: images in [-1, 1] -> (features, class probabilities).

An extractor is any object with a ``name`` (reported next to every metric) and a call
``extractor(images [B, C, H, W] in [-1, 1]) -> (features [B, D], logits [B, K] or None)``.
``--features`` names one (:func:`parse_features`; loaded by
:func:`difflab.pipeline.load_extractor`):

- ``builtin[:DATASET]`` (the default): a :class:`~.featurenet.FeatureNet` trained on the data
  set's train split on first use and cached (:mod:`.builtin`); nothing is downloaded.
- ``classifier:RUN``: the noisy classifier of ``difflab train-classifier`` (run folder or
  checkpoint) at the least noise, features = its pooled penultimate layer
  (:class:`NoisyClassifierFeatures`).
- ``featurenet:PATH``: a feature network saved by :func:`~.featurenet.save_feature_net`.
- ``inception:PATH``: the official FID protocol, the 2048-d pool3 features of the FID
  InceptionV3 with pytorch-fid's weights ``pt_inception-2015-12-05-6726825d.pth`` read from
  PATH (:mod:`.inception`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..data import from_uint8
from ..process import Process

FEATURE_KINDS = ("builtin", "classifier", "featurenet", "inception")
FEATURES_HELP = ("builtin[:DATASET], classifier:RUN (a 'difflab train-classifier' run folder "
                 "or checkpoint), featurenet:PATH or inception:PATH")


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


def parse_features(spec: str) -> tuple[str, str]:
    """``KIND:ARG`` -> (kind, arg); ``builtin`` alone gives (``"builtin"``, ``""``). Anything
    else is a one-line ValueError listing the forms."""
    kind, _, arg = spec.partition(":")
    if kind == "builtin" or (kind in FEATURE_KINDS and arg):
        return kind, arg
    raise ValueError(f"bad --features {spec!r}: use {FEATURES_HELP}")


class NoisyClassifierFeatures(nn.Module):
    """A noisy classifier p(y | x_t, t) as an extractor at the least noise: (pooled
    penultimate features [B, C], logits [B, K]) of clean images at t = t_min + 1e-3 (t_max -
    t_min) (t = 1 of T = 1000 for a discrete schedule: a time it was trained on)."""

    def __init__(self, net: nn.Module, process: Process):
        super().__init__()
        self.net = net
        t = process.t_min + 1e-3 * (process.t_max - process.t_min)
        c_noise = process.c_noise(torch.tensor([t], dtype=torch.float64)).float()
        self.register_buffer("c_noise", c_noise, persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.net.config
        if images.shape[1] != cfg.in_channels or images.shape[-1] != cfg.image_size:
            raise ValueError(f"the classifier was trained on {cfg.in_channels}-channel "
                             f"{cfg.image_size} px images, not {images.shape[1]}-channel "
                             f"{images.shape[-1]} px")
        x = images.to(self.c_noise.device).float()
        f = self.net.features(x, self.c_noise.expand(len(x)))
        return f, self.net.head[-1](f)


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


__all__ = ["FEATURES_HELP", "FEATURE_KINDS", "Extracted", "FeatureExtractor", "ModuleExtractor",
           "NoisyClassifierFeatures", "extract", "parse_features"]
