"""What every recipe trained on the one loop shares: its state and actions are the loop's.

A recipe builds the pieces and hands them to a :class:`~difflab.training.TrainLoop` as
``self.loop``; deriving from :class:`LoopRecipe` gives it the loop's state (``net``, ``ema``,
``opt``, ``step``, ``out_dir``) and actions (``run``, ``resume``, ``save``, ...) under the names
the command line and the tests use, so each recipe only says what is its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..training import EMA, TrainLoop

__all__ = ["LoopRecipe"]


class LoopRecipe:
    """Delegates the training state and actions to ``self.loop`` (set by the subclass)."""

    loop: TrainLoop

    @property
    def net(self) -> nn.Module:
        """The module trained (raw weights)."""
        return self.loop.model

    @property
    def ema(self) -> EMA:
        return self.loop.ema

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.loop.opt

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def out_dir(self) -> Path:
        return self.loop.out_dir

    def run(self, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
        """Train until ``steps`` total steps (default: the config's); see TrainLoop.run."""
        return self.loop.run(steps, progress)

    def resume(self, path: str | Path) -> None:
        self.loop.resume(path)

    def save(self) -> Path:
        return self.loop.save()

    def latest_checkpoint(self) -> Path | None:
        return self.loop.latest_checkpoint()

    def release_distributed(self) -> None:
        self.loop.release_distributed()

    def train_step(self) -> Tensor:
        """One optimisation step; its detached mean loss."""
        return self.loop.train_step()[0]
