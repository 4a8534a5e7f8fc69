"""Rebuilding a trained denoiser from a checkpoint (the one place that knows the classes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..networks import build_network
from ..parameterization import ClippedDenoiser, Denoiser, DenoiserFn
from ..process import process_from_config
from ..training.checkpoint import load_checkpoint, sub_dict


def load_denoiser(path: str | Path, ema: bool = True, device: str | torch.device = "cpu",
                  clip: bool = True) -> tuple[DenoiserFn, dict[str, Any]]:
    """Load a checkpoint (run folder, checkpoints folder, or step_*.json/.safetensors) and
    return its denoiser (EMA weights by default) in eval mode, and the checkpoint's metadata.
    With ``clip``, x0_hat is clipped to the data range saved with the checkpoint."""
    tensors, meta = load_checkpoint(path)
    net = build_network(meta["network"]["name"], meta["network"]["config"])
    weights = sub_dict(tensors, "ema" if ema else "model")
    if not weights:
        raise ValueError(f"checkpoint {path} has no {'ema' if ema else 'model'} weights")
    net.load_state_dict(weights)
    net.to(device).eval().requires_grad_(False)
    den: DenoiserFn = Denoiser(net, process_from_config(meta["process"]), meta["prediction"])
    if clip and meta.get("data_range"):
        den = ClippedDenoiser(den, *meta["data_range"])
    return den, meta
