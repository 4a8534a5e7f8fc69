"""Training the noise-conditional classifier used by classifier guidance.

Cross-entropy of p_phi(y | x_t, t) on x_t ~ q(x_t | x_0) with t drawn as for the diffusion
model (Dhariwal & Nichol 2021, sec. 4). Checkpoints use the same safetensors + JSON format as
diffusion models (network name ``classifier``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import ImageData, load_dataset
from ..networks import ClassifierConfig, NoisyClassifier
from ..process import make_process, q_sample
from .checkpoint import save_checkpoint
from .trainer import pick_device


@dataclass
class ClassifierTrainConfig:
    """A classifier run; the data options mean what they do for ``difflab train``."""

    dataset: str = "digits"
    resolution: int = 8
    channels: int | None = None
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0
    schedule: str = "cosine"
    T: int = 1000
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    out_dir: str = "runs/classifier"
    log_every: int = 50
    device: str = "auto"


def noisy_accuracy(net: NoisyClassifier, process, data: ImageData, t: float,
                   seed: int = 0) -> float:
    """Accuracy on ``data`` noised to time t (a quick check of what the classifier learnt)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(net.parameters()).device
    x0 = data.images.to(dev)
    x_t = q_sample(process, x0, t, torch.randn(x0.shape, generator=g).to(dev))
    with torch.no_grad():
        logits = net(x_t, process.c_noise(torch.full((len(x0),), t, dtype=torch.float64))
                     .float().to(dev))
    return float((logits.argmax(1).cpu() == data.labels).float().mean())


def train_classifier(config: ClassifierTrainConfig, data: ImageData | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train, save a checkpoint in ``config.out_dir`` and return a summary."""
    c, device = config, pick_device(config.device)
    data = data or load_dataset(c.dataset, c.resolution, c.channels)
    if data.labels is None:
        raise ValueError(f"dataset {c.dataset!r} has no labels to train a classifier on")
    torch.manual_seed(c.seed)
    net_cfg = ClassifierConfig(num_classes=data.num_classes, in_channels=data.channels,
                               image_size=data.resolution, base_channels=c.base_channels,
                               channel_mult=tuple(c.channel_mult),
                               num_res_blocks=c.num_res_blocks,
                               attention_resolutions=tuple(c.attention_resolutions),
                               dropout=c.dropout)
    net = NoisyClassifier(net_cfg).to(device)
    process = make_process(c.schedule, T=c.T)
    opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    g = torch.Generator(device=device).manual_seed(c.seed)
    images, labels = data.images.to(device), data.labels.to(device)
    out, log = Path(c.out_dir), []
    for step in tqdm(range(1, c.steps + 1), desc="classifier", disable=not progress):
        idx = torch.randint(len(images), (c.batch_size,), generator=g, device=device)
        t = process.sample_t(c.batch_size, g, device=device)
        x_t = q_sample(process, images[idx], t, torch.randn(
            images[idx].shape, generator=g, device=device))
        loss = F.cross_entropy(net(x_t, process.c_noise(t).float()), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % c.log_every == 0:
            log.append({"step": step, "loss": float(loss.detach())})
    net.eval()
    acc = {f"t={t:g}": noisy_accuracy(net, process, data, t)
           for t in (0.1 * process.t_max, 0.5 * process.t_max, 0.8 * process.t_max)}
    meta = {"config": asdict(c), "network": {"name": "classifier", "config": asdict(net_cfg)},
            "process": process.to_config(), "class_names": list(data.class_names),
            "train_accuracy_noisy": acc}
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    path = save_checkpoint(out / "checkpoints", c.steps, tensors, meta)
    out.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return {"checkpoint": str(path), "accuracy": acc, "final_loss": log[-1]["loss"] if log
            else None}
