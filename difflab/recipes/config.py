"""The training run's configuration: one dataclass, saved as JSON beside every checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from .images import MODEL_SIZES


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults: the digits job of the README.

    Image data trains a U-Net (``model_size`` and the fields after it); a 2-D toy data set
    (``dataset="toy:moons"``, ...) trains an ``MLPDenoiser`` (``base_channels`` sets its width).
    """

    # data
    dataset: str = "digits"            # "digits", an image folder path, or "toy:NAME" (2-D)
    toy_points: int = 20000            # size of a 2-D toy data set
    resolution: int = 8
    channels: int | None = None        # None: 1 for digits, 3 for folders
    class_conditional: bool = True     # use folder / dataset labels when there are any
    text_encoder: str = "minilm"       # captioned data (shapes): "minilm" or a local HF folder
    # model
    model_size: str = "tiny"           # preset from MODEL_SIZES; fields below override it
    base_channels: int | None = None
    channel_mult: list[int] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: list[int] = field(default_factory=lambda: [4])
    num_heads: int = 4
    dropout: float = 0.1
    time_conditioning: str = "scale_shift"
    # process and objective
    schedule: str = "cosine"
    T: int = 1000
    zero_terminal_snr: bool = False
    prediction: str = "eps"
    loss_space: str | None = None      # None: the prediction type's own space
    p_uncond: float = 0.1              # label dropout into the null label
    objective: str = "simple"          # simple, vlb, hybrid, edm (difflab.objectives)
    weighting: str = "constant"        # constant, snr, min_snr, truncated_snr, edm
    min_snr_gamma: float = 5.0         # gamma of the min_snr weighting
    vlb_lambda: float = 0.001          # weight of L_vlb in the hybrid objective
    time_sampling: str | None = None   # uniform, continuous, lognormal, importance (None: auto)
    sigma_data: float = 0.5            # data std of the EDM preconditioning
    # optimisation
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # bookkeeping
    seed: int = 0
    out_dir: str = "runs/digits"
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_steps: int = 50
    device: str = "auto"               # "auto", "cpu", "cuda", "cuda:1", ...
    # speed
    precision: str = "fp32"            # "fp32", "bf16" (CUDA or CPU) or "fp16" (CUDA)
    compile: bool = False              # torch.compile the training step's network
    compile_mode: str = "default"      # torch.compile mode: default, reduce-overhead, ...
    channels_last: bool = True         # NHWC memory layout for images and conv weights
    grad_checkpointing: bool = False   # recompute activations in backward to save memory
    reuse_cpu_memory: bool = True      # CPU: keep freed memory in the process (memory.py)

    def model_config(self) -> dict[str, Any]:
        """Resolved U-Net architecture (preset plus explicit overrides)."""
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.model_size!r}; choose from "
                             f"{sorted(MODEL_SIZES)}")
        preset = MODEL_SIZES[self.model_size]
        return {
            "base_channels": self.base_channels or preset["base_channels"],
            "channel_mult": list(self.channel_mult or preset["channel_mult"]),
            "num_res_blocks": self.num_res_blocks or preset["num_res_blocks"],
            "attention_resolutions": list(self.attention_resolutions),
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "time_conditioning": self.time_conditioning,
            "image_size": self.resolution,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict (keys as in ``TrainConfig``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot parse config file {p}: {e}") from e
