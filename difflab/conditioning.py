"""Conditions a denoiser can receive besides class labels: token embeddings of a prompt.

A :class:`TextCond` is what flows through ``Denoiser(x, t, cond)`` into a U-Net built with a
``context_dim``: per-token embeddings ``[B, L, D]`` and a key-padding mask ``[B, L]``
(True = real token). It behaves like a batch tensor where samplers, ``generate`` and the
guidance wrappers need one: ``len``, indexing along the batch, ``.to(device)``, and
:func:`cat_cond` / :func:`expand_cond` that also accept plain label tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LatentCond", "TextCond", "cat_cond", "expand_cond"]


@dataclass(frozen=True)
class TextCond:
    """Token embeddings ``tokens [B, L, D]`` and mask ``mask [B, L]`` (bool, True = token).

    Every row must keep at least one token (a BERT-style encoder always emits [CLS] and
    [SEP], even for the empty prompt), so that attention over it is defined.
    """

    tokens: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(f"TextCond needs tokens [B, L, D] and mask [B, L]; got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.mask.shape)}")
        if self.mask.dtype != torch.bool:
            object.__setattr__(self, "mask", self.mask.bool())

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: Any) -> TextCond:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextCond(self.tokens[index], self.mask[index])

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TextCond:
        """Move to ``device`` (and cast the embeddings to ``dtype``); the mask stays bool."""
        return TextCond(self.tokens.to(device=device, dtype=dtype), self.mask.to(device))

    def pad_to(self, length: int) -> TextCond:
        """Right-pad with masked-out zero tokens to ``length`` tokens (padding changes no
        attention output, since masked keys get zero weight)."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {self.tokens.shape[1]} tokens to {length}")
        return TextCond(F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra)))

    @staticmethod
    def cat(conds: Sequence[TextCond]) -> TextCond:
        """Concatenate along the batch, padding every part to the longest token count."""
        length = max(c.tokens.shape[1] for c in conds)
        parts = [c.pad_to(length) for c in conds]
        return TextCond(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))


@dataclass(frozen=True)
class LatentCond:
    """A condition plus a latent z for a generator G(x_t, z, t) (the denoising diffusion
    GAN, Xiao et al. 2022): ``labels`` as a network takes them (or None), ``z`` drawn by the
    sampler from its generator (``samplers.ddgan``)."""

    labels: Any
    z: Tensor

    def __len__(self) -> int:
        return len(self.z)


def cat_cond(conds: Sequence[Any]) -> Any:
    """``torch.cat`` for label tensors, :meth:`TextCond.cat` for token conditions (and
    both parts of :class:`LatentCond` ones)."""
    if isinstance(conds[0], LatentCond):
        labels = [c.labels for c in conds]
        return LatentCond(None if labels[0] is None else cat_cond(labels),
                          torch.cat([c.z for c in conds]))
    if isinstance(conds[0], TextCond):
        return TextCond.cat(conds)
    return torch.cat(list(conds))


def expand_cond(cond: Any, n: int) -> Any:
    """Repeat a one-example condition (a [1] label tensor or a one-row TextCond) to n rows."""
    if isinstance(cond, TextCond) and len(cond) == 1 and n != 1:
        return TextCond(cond.tokens.expand(n, -1, -1), cond.mask.expand(n, -1))
    if torch.is_tensor(cond) and cond.ndim >= 1 and len(cond) == 1 and n != 1:
        return cond.expand(n, *cond.shape[1:])
    return cond
