"""Text-conditioned training: captions as indices into a table of prompt embeddings.

A captioned data set stores each image's caption as a label into its list of captions, so the
trainer's label dropout applies unchanged: a dropped label becomes index K (the number of
captions), which this table maps to the empty prompt "" -- the null condition of
classifier-free guidance for text (Ho & Salimans 2022; Saharia et al. 2022). Every caption is
encoded once, before training, so a step costs no text-encoder time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..conditioning import TextCond

__all__ = ["CaptionTable"]


class CaptionTable:
    """Embeddings of ``captions`` plus the empty prompt (row ``len(captions)``) on ``device``.

    ``table(indices [B]) -> TextCond`` with tokens ``[B, L, D]`` (L = longest caption).
    """

    def __init__(self, encoder, captions: Sequence[str], device: torch.device | str = "cpu"):
        cond = encoder(list(captions) + [""])
        self.tokens, self.mask = cond.tokens.to(device), cond.mask.to(device)
        self.null_index = len(captions)
        self.dim = int(self.tokens.shape[-1])

    def __call__(self, indices: Tensor) -> TextCond:
        return TextCond(self.tokens[indices], self.mask[indices])
