"""Exponential moving average of weights with warm-up.

decay_k = min(decay, (1 + k) / (10 + k)) at update k (the warm-up used by TensorFlow's
ExponentialMovingAverage with num_updates, and by DDPM's and score-SDE's training code):
early on the average forgets quickly, so samples from an early EMA are already the model's,
not those of its random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds a frozen copy of ``model`` whose parameters track an EMA of the model's."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_p = list(self.model.parameters())
        p = [q.detach() for q in model.parameters()]
        torch._foreach_lerp_(ema_p, p, 1.0 - d)  # ema = d ema + (1 - d) p
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates
