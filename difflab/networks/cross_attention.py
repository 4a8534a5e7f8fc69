"""Cross-attention from image features to prompt tokens (Rombach et al. 2022, sec. 3.3).

``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` with queries from the image positions
(``Q = W_q norm(h)``) and keys/values from the text tokens (``K = W_k tau(y)``,
``V = W_v tau(y)``); padding tokens are removed by a key-padding mask, so padding a prompt
never changes the output.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import TextCond

__all__ = ["CrossAttentionBlock", "pooled_context"]


def pooled_context(context: TextCond) -> Tensor:
    """Mean of the unmasked token embeddings: [B, L, D] -> [B, D].

    Added (after a linear map) to the time embedding, it gives every ResBlock a global view
    of the prompt, as Imagen does with its pooled text embedding (Saharia et al. 2022, sec. 2.4).
    """
    m = context.mask.to(context.tokens.dtype).unsqueeze(-1)  # [B, L, 1]
    return (context.tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


class CrossAttentionBlock(nn.Module):
    """Multi-head cross-attention to a :class:`TextCond`, residual, zero-init output.

    ``forward(x [B, C, H, W], context | None) -> [B, C, H, W]``; with no context the block is
    the identity (an unconditional call of a text model; the trained null condition is the
    empty prompt's embedding, not ``None``).
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Conv2d(channels, channels, 1)
        for p in self.proj.parameters():  # start as the identity, like the other blocks
            nn.init.zeros_(p)

    def forward(self, x: Tensor, context: TextCond | None) -> Tensor:
        if context is None:
            return x
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, heads, d, h * w).transpose(-1, -2)  # [B, n, HW, d]
        tokens = context.tokens.to(x.dtype)
        k, v = self.kv(tokens).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)  # [B,n,L,d]
        keep = context.mask[:, None, None, :]  # [B, 1, 1, L]: True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, n, HW, d]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))
