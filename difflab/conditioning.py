"""Conditions a denoiser can receive besides class labels: token embeddings of a prompt, and
the guidance scale as a network input.

A :class:`TextCond` is what flows through ``Denoiser(x, t, cond)`` into a U-Net built with a
``context_dim``: per-token embeddings ``[B, L, D]`` and a key-padding mask ``[B, L]``
(True = real token). It behaves like a batch tensor where samplers, ``generate`` and the
guidance wrappers need one: ``len``, indexing along the batch, ``.to(device)``, and
:func:`cat_cond` / :func:`expand_cond` that also accept plain label tensors.

A :class:`GuidanceCond` wraps any of these (labels, a ``TextCond`` or None) together with a
per-example guidance scale ``w [B]``, for networks that take the scale as an input instead of
being guided by two calls (guidance-distilled students, Meng et al. 2023; latent consistency
models, Luo et al. 2023). A U-Net built with ``guidance_embedding=True`` reads it; the
pipeline's :class:`~difflab.guidance.GuidanceInput` wrapper builds it from ``guidance=w``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GuidanceCond", "TextCond", "cat_cond", "expand_cond", "split_guidance"]


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
class GuidanceCond:
    """A condition ``cond`` ([B] labels, a :class:`TextCond`, or None for the null condition)
    plus the guidance scale ``w [B]`` (float) that a guidance-input network takes as an input.

    ``w`` is the scale in the pipeline's convention, gamma in eps(null) + gamma (eps(y) -
    eps(null)) (``Pipeline.denoiser(guidance=...)``): 1 is the conditional model. It behaves
    like a batch tensor (``len``, indexing, ``.to``, :func:`cat_cond`, :func:`expand_cond`).
    """

    cond: Any
    w: Tensor

    def __post_init__(self) -> None:
        if self.w.ndim != 1:
            raise ValueError(f"GuidanceCond needs w of shape [B]; got {tuple(self.w.shape)}")
        if self.cond is not None and len(self.cond) != len(self.w):
            raise ValueError(f"GuidanceCond: {len(self.cond)} conditions but {len(self.w)} "
                             "guidance scales")

    def __len__(self) -> int:
        return int(self.w.shape[0])

    def __getitem__(self, index: Any) -> GuidanceCond:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return GuidanceCond(None if self.cond is None else self.cond[index], self.w[index])

    def to(self, device: torch.device | str | None = None) -> GuidanceCond:
        """Move the condition and the scales to ``device``."""
        cond = None if self.cond is None else self.cond.to(device)
        return GuidanceCond(cond, self.w.to(device))


def split_guidance(cond: Any) -> tuple[Any, Tensor | None]:
    """(the inner condition, the guidance scales [B] or None) of any condition."""
    if isinstance(cond, GuidanceCond):
        return cond.cond, cond.w
    return cond, None


def cat_cond(conds: Sequence[Any]) -> Any:
    """``torch.cat`` for label tensors, :meth:`TextCond.cat` for token conditions, both parts
    for :class:`GuidanceCond` (whose inner conditions must all be given or all be None)."""
    if isinstance(conds[0], GuidanceCond):
        inner = [c.cond for c in conds]
        if any(c is None for c in inner) and not all(c is None for c in inner):
            raise ValueError("cannot concatenate guidance conditions with and without labels")
        return GuidanceCond(None if inner[0] is None else cat_cond(inner),
                            torch.cat([c.w for c in conds]))
    if isinstance(conds[0], TextCond):
        return TextCond.cat(conds)
    return torch.cat(list(conds))


def expand_cond(cond: Any, n: int) -> Any:
    """Repeat a one-example condition (a [1] label tensor, a one-row TextCond or
    GuidanceCond) to n rows."""
    if isinstance(cond, GuidanceCond) and len(cond) == 1 and n != 1:
        return GuidanceCond(expand_cond(cond.cond, n), cond.w.expand(n))
    if isinstance(cond, TextCond) and len(cond) == 1 and n != 1:
        return TextCond(cond.tokens.expand(n, -1, -1), cond.mask.expand(n, -1))
    if torch.is_tensor(cond) and cond.ndim >= 1 and len(cond) == 1 and n != 1:
        return cond.expand(n, *cond.shape[1:])
    return cond
