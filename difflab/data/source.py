"""Batch sources: where a training loop's batches come from.

A source answers ``batch(step, generator) -> Batch``: the *global* batch of a step (every
rank of a distributed run asks for the same one and trains on its own slice). The in-memory
sources hold the whole data set on the device; a streaming source can implement the same
method later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Batch", "BatchSource", "EpochSource", "RandomSource"]


@dataclass
class Batch:
    """``x`` [B, ...] (images or points) and optional integer ``labels`` [B]."""

    x: Tensor
    labels: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


class BatchSource(Protocol):
    """The global batch of ``step``; ``generator`` is the run's (checkpointed) generator,
    for sources that draw from it."""

    def batch(self, step: int, generator: torch.Generator) -> Batch: ...


@dataclass
class EpochSource:
    """Batches from an epoch-wise shuffled stream, a stateless function of (seed, step).

    Batch k holds positions k*B .. k*B+B-1 of the stream in which epoch e is a permutation
    seeded by (seed, e), so a resumed run needs no data-loader state. Indices are computed on
    ``x``'s device from permutations copied there once: a step never copies from the host.
    The run's generator is not used.
    """

    x: Tensor
    labels: Tensor | None
    batch_size: int
    seed: int = 0
    _perms: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)

    def indices(self, step: int) -> Tensor:
        """Data indices [B] of the batch at ``step`` (spanning epochs when needed)."""
        n, b, dev = len(self.x), self.batch_size, self.x.device
        first, last = step * b // n, ((step + 1) * b - 1) // n
        pos = torch.arange(step * b, (step + 1) * b, device=dev)
        out = self._epoch_perm(first)[pos % n]
        for epoch in range(first + 1, last + 1):  # a batch that spans epoch boundaries
            out = torch.where(pos // n == epoch, self._epoch_perm(epoch)[pos % n], out)
        return out

    def _epoch_perm(self, epoch: int) -> Tensor:
        """The permutation of ``epoch`` on the device; the last two are cached."""
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.x), generator=g)
            if self.x.device.type == "cuda":
                perm = perm.pin_memory()
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm.to(self.x.device, non_blocking=True)
        return self._perms[epoch]

    def batch(self, step: int, generator: torch.Generator | None = None) -> Batch:
        idx = self.indices(step)
        return Batch(self.x[idx], None if self.labels is None else self.labels[idx])


@dataclass
class RandomSource:
    """Batches drawn uniformly with replacement, from the run's generator (so a resumed
    run continues the same draws)."""

    x: Tensor
    labels: Tensor | None
    batch_size: int

    def batch(self, step: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(len(self.x), (self.batch_size,), generator=generator,
                            device=self.x.device)
        return Batch(self.x[idx], None if self.labels is None else self.labels[idx])
