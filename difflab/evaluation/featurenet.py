"""The feature network: a small CNN trained on clean labelled images, for metrics only.

On small domains (8 x 8 digits, a labelled folder of icons) ImageNet Inception features say
little, so difflab trains this network on the labelled data and computes FID / KID / IS /
precision-recall in its penultimate feature space (the idea of "domain-specific FID", e.g. the
LeNet features used for MNIST). It is not a classifier for guidance (that is the noisy
classifier p(y | x_t, t) of ``difflab train-classifier``). It is saved as ``NAME.safetensors``
(weights) plus ``NAME.json`` (architecture, class names, test accuracy), so any later
evaluation uses the exact same extractor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data import ImageData
from ..io import LoadError, atomic_write, load_state, read_json, read_safetensors


@dataclass
class FeatureNetConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64
    class_names: list[str] = field(default_factory=list)
    stem: int = 0  # stride-2 convolutions in front, each halving the resolution (64 px: 2)
    pool: str = "avg4"  # "avg4": average to a 4 x 4 map; "max": global max over positions


class FeatureNet(nn.Module):
    """``stem`` stride-2 convolutions, three convolutions and an average pool to a 4 x 4
    map, then a ``feature_dim`` ReLU layer (the features) and a linear classifier. Works at
    any input resolution >= 4 * 2**stem."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = c = config
        if c.pool not in ("avg4", "max"):
            raise ValueError(f"FeatureNetConfig.pool must be 'avg4' or 'max', got {c.pool!r}")
        w = c.width
        stem: list[nn.Module] = []
        for i in range(c.stem):  # cheap at high resolution: the 3 convolutions run smaller
            stem += [nn.Conv2d(c.in_channels if i == 0 else w, w, 3, stride=2, padding=1),
                     nn.ReLU()]
        self.convs = nn.Sequential(
            *stem,
            nn.Conv2d(c.in_channels if c.stem == 0 else w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4) if c.pool == "avg4" else nn.AdaptiveMaxPool2d(1))
        cells = 16 if c.pool == "avg4" else 1
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * cells, c.feature_dim),
                                      nn.ReLU())
        self.head = nn.Linear(c.feature_dim, c.num_classes)
        # per-feature mean and std on the training data (set by train_feature_net): features
        # are reported standardised so that kernel metrics (KID's (x.y / D + 1)^3) see O(1)
        # values, as they do for Inception features
        self.register_buffer("feature_mean", torch.zeros(c.feature_dim))
        self.register_buffer("feature_std", torch.ones(c.feature_dim))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """[-1, 1] images [B, C, H, W] -> (standardised features [B, feature_dim], logits
        [B, K])."""
        f = self.features(self.convs(images.float()))
        return (f - self.feature_mean) / self.feature_std, self.head(f)

    @torch.no_grad()
    def set_feature_scale(self, images: Tensor, batch_size: int = 512) -> None:
        """Fit ``feature_mean`` / ``feature_std`` to the raw features of ``images``."""
        dev = self.feature_mean.device
        f = torch.cat([self.features(self.convs(images[s:s + batch_size].to(dev).float()))
                       for s in range(0, len(images), batch_size)])
        self.feature_mean.copy_(f.mean(0))
        self.feature_std.copy_(f.std(0).clamp(min=1e-3))


@torch.no_grad()
def feature_net_accuracy(model: FeatureNet, data: ImageData, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(data), batch_size):
        logits = model(data.images[s:s + batch_size])[1]
        correct += int((logits.argmax(1) == data.labels[s:s + batch_size]).sum())
    return correct / max(1, len(data))


def train_feature_net(train: ImageData, steps: int = 1500, batch_size: int = 128,
                      lr: float = 2e-3, seed: int = 0, noise: float = 0.1,
                      config: FeatureNetConfig | None = None,
                      device: str | torch.device = "cpu") -> FeatureNet:
    """Train with AdamW and cross-entropy on ``train`` (labels required); returns the model on
    the CPU. Small Gaussian input noise and random one-pixel shifts make the features less
    brittle on generated images."""
    if train.labels is None:
        raise ValueError("the feature network needs a labelled data set")
    torch.manual_seed(seed)
    config = config or FeatureNetConfig(in_channels=train.channels,
                                        num_classes=int(train.num_classes or 0),
                                        class_names=list(train.class_names))
    model = FeatureNet(config).to(device)
    images, labels = train.images.to(device), train.labels.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=g)
        x = images[idx.to(device)]
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        x = x + noise * torch.randn(x.shape, generator=g).to(device)
        loss = F.cross_entropy(model(x)[1], labels[idx.to(device)])
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().set_feature_scale(images)
    return model.cpu().requires_grad_(False)


def save_feature_net(model: FeatureNet, path: str | Path,
                     info: dict[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` and ``path.json`` (architecture + ``info``); returns the
    JSON path."""
    stem = Path(path).with_suffix("")
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(weights, tmp))
    meta = {"kind": "difflab.FeatureNet", "config": asdict(model.config),
            "info": info or {}}
    atomic_write(stem.with_suffix(".json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return stem.with_suffix(".json")


FEATURE_NET_KINDS = ("difflab.FeatureNet", "difflab.FeatureClassifier")  # the second: old files


def load_feature_net(path: str | Path) -> tuple[FeatureNet, dict[str, Any]]:
    """Load a feature network saved by :func:`save_feature_net` (``.json`` or ``.safetensors``
    path, or the common stem); returns the model in eval mode and its metadata."""
    stem = Path(path).expanduser()
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (js, st):
        if not p.is_file():
            raise FileNotFoundError(f"feature network file not found: {p} (a feature network "
                                    f"is {js.name} + {st.name}, see 'difflab eval --help')")
    meta = read_json(js)
    if not isinstance(meta, dict) or meta.get("kind") not in FEATURE_NET_KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        hint = (" (a checkpoint: for a 'difflab train-classifier' run use "
                "--features classifier:PATH)" if isinstance(meta, dict) and "network" in meta
                else "")
        raise LoadError(f"{js} is not a feature network's JSON (kind {kind!r}){hint}")
    try:
        model = FeatureNet(FeatureNetConfig(**meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{js} is not a feature network's JSON: {e}") from None
    load_state(model, read_safetensors(st), str(st))
    return model.eval().requires_grad_(False), meta


__all__ = ["FEATURE_NET_KINDS", "FeatureNet", "FeatureNetConfig", "feature_net_accuracy",
           "load_feature_net", "save_feature_net", "train_feature_net"]
