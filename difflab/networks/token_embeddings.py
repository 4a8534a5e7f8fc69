"""Learned token embeddings: the trainable part of textual inversion (Gal et al. 2022).

Textual inversion ("An Image is Worth One Word", Gal et al. 2022, sec. 3) adds a new
pseudo-word S* to a frozen text encoder's vocabulary and learns only its input embedding
v* (eq. 2: v* = argmin_v E ||eps - eps_theta(z_t, t, c_theta(y with S* -> v))||^2); the
encoder and the denoiser stay frozen. This module holds the rows v* of the new tokens, one
per token, so that they are saved and loaded like any network (an adapter stage of kind
``"embeddings"``); the text encoder (:mod:`difflab.text.tokens`) reads them as the input
embeddings of the new token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["TokenEmbeddings", "TokenEmbeddingsConfig"]


@dataclass
class TokenEmbeddingsConfig:
    """The new tokens (as typed in prompts), the encoder's embedding width, and for
    reference the words each row was initialised from."""

    tokens: list[str] = field(default_factory=list)
    dim: int = 384
    init_words: list[str] = field(default_factory=list)
    text_encoder: str = "minilm"

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("token embeddings need at least one token")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"token embeddings: repeated tokens {self.tokens}")
        if self.init_words and len(self.init_words) != len(self.tokens):
            raise ValueError("token embeddings: one init word per token")
        if self.dim < 1:
            raise ValueError(f"token embeddings: dim must be at least 1, got {self.dim}")


class TokenEmbeddings(nn.Module):
    """``weight [len(tokens), dim]``: row i is the input embedding of ``config.tokens[i]``."""

    def __init__(self, config: TokenEmbeddingsConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(len(config.tokens), config.dim))

    @property
    def tokens(self) -> list[str]:
        return list(self.config.tokens)

    def forward(self) -> Tensor:
        """The rows (``[n_tokens, dim]``)."""
        return self.weight
