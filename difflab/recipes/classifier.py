"""The noisy-classifier recipe: p_phi(y | x_t, t) for classifier guidance, on the one loop.

Cross-entropy of p_phi(y | x_t, t) on x_t ~ q(x_t | x_0) with t drawn as for the diffusion
model (Dhariwal & Nichol 2021, sec. 4). Batches are drawn with replacement from the run's
generator, then t and the noise, in that order. Checkpoints use the same safetensors + JSON
format as diffusion models (network name ``classifier``); no EMA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_ranges, option
from ..data import Batch, ImageData, RandomSource, load_dataset
from ..networks import ClassifierConfig, NoisyClassifier
from ..process import PROCESS_NAMES, Process, make_process, q_sample
from ..training import LoopConfig, StepContext, TrainLoop, init_device

__all__ = ["ClassifierLoss", "ClassifierTrainConfig", "noisy_accuracy", "train_classifier"]


@dataclass
class ClassifierTrainConfig:
    """A classifier run; the data options mean what they do for ``difflab train``."""

    dataset: str = option("digits", "a labelled image data set: 'digits', 'shapes' or a folder "
                                    "of images (sub-folders = class labels)")
    resolution: int = option(8, "image size the data is resized/cropped to", ge=1)
    channels: Literal[1, 3] | None = option(None, "1 (grey) or 3 (RGB); default 1 for digits, "
                                                  "3 for folders")
    base_channels: int = option(32, "classifier width at the first resolution", ge=1)
    channel_mult: list[int] = option(factory=lambda: [1, 2],
                                     help="width multiplier per resolution level")
    num_res_blocks: int = option(1, "residual blocks per resolution level", ge=1)
    attention_resolutions: list[int] = option(factory=list,
                                              help="feature-map sizes with self-attention")
    dropout: float = option(0.0, "dropout in residual blocks", ge=0, lt=1)
    schedule: str = option("cosine", "noise schedule of the diffusion model it will guide",
                           choices=PROCESS_NAMES)
    T: int = option(1000, "number of diffusion steps of a discrete schedule", ge=1)
    steps: int = option(1500, "total optimisation steps", resume=True, ge=1)
    batch_size: int = option(128, "images per step (drawn with replacement)", ge=1)
    lr: float = option(1e-3, "AdamW learning rate", gt=0)
    weight_decay: float = option(0.05, "AdamW weight decay", ge=0)
    seed: int = option(0, "seed of the initialisation, batches and noise")
    out_dir: str = option("runs/classifier", "run folder: metrics.jsonl, checkpoints/",
                          resume=True)
    log_every: int = option(50, "steps between metric lines", resume=True, ge=1)
    log: Literal["jsonl", "tensorboard"] = option(
        "jsonl", "metric lines: jsonl (RUN/metrics.jsonl) or tensorboard (also TensorBoard "
        "scalars in RUN/tensorboard; pip install -e '.[tensorboard]')", resume=True)
    device: str = option("auto", "auto, cpu, cuda, cuda:N", resume=True)

    def __post_init__(self) -> None:
        check_ranges(self)  # the same range checks when built directly as from a file


@dataclass
class ClassifierLoss:
    """Cross-entropy on x_t ~ q(x_t | x_0): t, then noise, from the run's generator."""

    process: Process

    def __call__(self, module: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        g, sl, b = ctx.generator, ctx.local, len(batch)
        t = self.process.sample_t(b, g, device=ctx.device)
        noise = torch.randn(batch.x.shape, generator=g, device=ctx.device)
        x_t = q_sample(self.process, batch.x[sl], t[sl], noise[sl])
        return F.cross_entropy(module(x_t, self.process.c_noise(t[sl]).float()),
                               batch.labels[sl])


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
                     progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train, save a checkpoint in ``config.out_dir`` and return a summary (``overwrite``:
    delete another run found in ``out_dir`` instead of refusing)."""
    c = config
    dist, device = init_device(c.device)
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
    source = RandomSource(data.images.to(device), data.labels.to(device), c.batch_size)
    accuracy: dict[str, float] = {}

    def meta() -> dict[str, Any]:
        return {"config": asdict(c), "network": {"name": "classifier", "config": asdict(net_cfg)},
                "process": process.to_config(), "class_names": list(data.class_names),
                **({"train_accuracy_noisy": accuracy} if accuracy else {})}

    loop = TrainLoop(
        LoopConfig(steps=c.steps, lr=c.lr, weight_decay=c.weight_decay, warmup_steps=0,
                   grad_clip=0.0, ema_decay=None, fused_adamw=False, log_every=c.log_every,
                   log=c.log,
                   sample_every=0, checkpoint_every=0, keep_checkpoints=0, out_dir=c.out_dir,
                   seed=c.seed, reuse_cpu_memory=False, progress_desc="classifier",
                   overwrite=overwrite),
        net, source, ClassifierLoss(process), meta, dist, device)
    result = loop.run(progress=progress, save_final=False)
    net.eval()
    accuracy |= {f"t={t:g}": noisy_accuracy(net, process, data, t)
                 for t in (0.1 * process.t_max, 0.5 * process.t_max, 0.8 * process.t_max)}
    path = loop.save() if dist.is_main else None  # the final checkpoint, now with accuracy
    return {"checkpoint": str(path), "accuracy": accuracy, "final_loss": result.get("loss")}
