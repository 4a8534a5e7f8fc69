"""Cross-attention from image features to prompt tokens (Rombach et al. 2022, sec. 3.3).

``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` with queries from the image positions
(``Q = W_q norm(h)``) and keys/values from the text tokens (``K = W_k tau(y)``,
``V = W_v tau(y)``); padding tokens are removed by a key-padding mask, so padding a prompt
never changes the output.

Attention processors (used by Prompt-to-Prompt editing, Hertz et al. 2022): every attention
block of a network (this cross-attention block and the U-Net's self-attention block) has an
``attn_processor`` attribute, None by default, when the block calls the fused
``F.scaled_dot_product_attention`` as always. When set to a function
``processor(block, probs) -> probs``, the block computes the attention probabilities
``softmax(Q K^T / sqrt(d))`` [B, heads, queries, keys] explicitly, hands them to the processor
(which may read them, or return others of the same shape) and applies what it returns to V.
:func:`attention_processor` sets one processor on every block of a network for a ``with``
block. ``block.is_cross`` tells the two kinds apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import TextCond

__all__ = ["AttentionProcessor", "CrossAttentionBlock", "attend", "attention_blocks",
           "attention_processor", "pooled_context"]

#: ``processor(block, probs [B, heads, queries, keys]) -> probs`` (see the module docstring)
AttentionProcessor = Callable[[nn.Module, Tensor], Tensor]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block: nn.Module,
           processor: AttentionProcessor | None) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for q [B, n, Q, d], k, v [B, n, K, d] and a boolean
    key mask broadcastable to [B, n, Q, K] (True = attend). No processor: the fused
    ``F.scaled_dot_product_attention``, unchanged. A processor: the probabilities are
    computed explicitly (in float32), passed through ``processor(block, probs)``, then
    applied to v."""
    if processor is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, n, Q, K]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = processor(block, scores.softmax(dim=-1))
    return (probs @ v.float()).to(v.dtype)


def attention_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every attention block in ``net`` that takes a processor."""
    return [(name, m) for name, m in net.named_modules() if hasattr(m, "attn_processor")]


@contextmanager
def attention_processor(net: nn.Module, processor: AttentionProcessor | None
                        ) -> Iterator[nn.Module]:
    """Within the ``with`` block every attention block of ``net`` runs ``processor``; the
    blocks' previous processors are restored on exit (also on an error)."""
    blocks = [m for _, m in attention_blocks(net)]
    before = [m.attn_processor for m in blocks]
    try:
        for m in blocks:
            m.attn_processor = processor
        yield net
    finally:
        for m, p in zip(blocks, before, strict=True):
            m.attn_processor = p


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
    empty prompt's embedding, not ``None``). ``attn_processor``: see the module docstring.
    """

    is_cross = True

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
        self.attn_processor: AttentionProcessor | None = None

    def forward(self, x: Tensor, context: TextCond | None) -> Tensor:
        if context is None:
            return x
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, heads, d, h * w).transpose(-1, -2)  # [B, n, HW, d]
        tokens = context.tokens.to(x.dtype)
        k, v = self.kv(tokens).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)  # [B,n,L,d]
        keep = context.mask[:, None, None, :]  # [B, 1, 1, L]: True = attend
        out = attend(q, k, v, keep, self, self.attn_processor)  # [B, n, HW, d]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))
