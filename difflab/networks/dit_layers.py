"""Building blocks of the diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers", sec. 3.2): patchify / unpatchify, the fixed 2-D sine-cosine position
embedding, and the adaLN-Zero transformer block.

Shapes in comments: ``B`` batch, ``N`` tokens (``(H / p) * (W / p)``), ``D`` hidden width,
``p`` patch size, ``L`` prompt tokens.

Both attention layers take an attention processor (``attn_processor``, None by default: the
fused kernel as always; ``is_cross`` tells them apart), as the U-Net's blocks do, so
Prompt-to-Prompt editing works on text DiTs too (see :mod:`difflab.networks.cross_attention`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.conditioning import TextCond
from difflab.networks.cross_attention import AttentionProcessor, attend

__all__ = ["AdaLNZeroBlock", "FinalLayer", "modulate", "patchify", "sincos_position_embedding",
           "unpatchify"]


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping ``p x p`` patches, one token each (DiT sec. 3.2).

    ``x [B, C, H, W] -> [B, (H/p) * (W/p), p * p * C]``: tokens in row-major order of the
    patch grid, features ordered (row in patch, column in patch, channel). The inverse is
    :func:`unpatchify`."""
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
    t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
    return t.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Put patches back together: ``[B, (H/p) * (W/p), p * p * C] -> [B, C, H, W]`` (the
    inverse of :func:`patchify`; C follows from the token width)."""
    b, n, f = tokens.shape
    p = patch_size
    gh, gw = height // p, width // p
    if height % p or width % p or n != gh * gw or f % (p * p):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not tile a {height}x{width} image "
                         f"with patch_size={p}")
    c = f // (p * p)
    t = tokens.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
    return t.reshape(b, c, height, width)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[N] positions -> [N, dim]: sin(pos w_k) then cos(pos w_k), w_k = 10000^(-k / (dim/2))
    (the Transformer's encoding, Vaswani et al. 2017)."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = pos.to(torch.float64)[:, None] * omega[None, :]  # [N, dim/2]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_position_embedding(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding of a ``grid_h x grid_w`` patch grid (as in
    MAE and DiT): half the features encode the row, half the column. ``-> [grid_h * grid_w,
    dim]`` float32, rows in :func:`patchify`'s token order. ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"the position embedding needs a width divisible by 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # token i is at (i // w, i % w)
    cols = torch.arange(grid_w).repeat(grid_h)
    emb = torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1)
    return emb.float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer norm's affine step: ``x * (1 + scale) + shift`` per sample (x [B, N, D],
    shift and scale [B, D])."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _heads(t: Tensor, heads: int) -> Tensor:
    """[B, N, D] -> [B, heads, N, D / heads]."""
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """[B, heads, N, d] -> [B, N, heads * d]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens with PyTorch's fused
    ``scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU); with
    ``attn_processor`` set, explicit probabilities passed through it (module docstring)."""

    is_cross = False

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_processor: AttentionProcessor | None = None

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge(attend(q, k, v, None, self, self.attn_processor)))


class TokenCrossAttention(nn.Module):
    """Pre-norm cross-attention from the image tokens to prompt tokens (Rombach et al. 2022,
    sec. 3.3; between self-attention and the MLP as in PixArt-alpha), residual, output
    projection zero-initialised. Padding tokens are masked out; with no prompt (``None``)
    it is the identity. ``attn_processor``: see the module docstring."""

    is_cross = True

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_processor: AttentionProcessor | None = None

    def forward(self, x: Tensor, context: TextCond | None) -> Tensor:
        if context is None:
            return x
        q = _heads(self.q(self.norm(x)), self.num_heads)  # [B, n, N, d]
        k, v = (_heads(t, self.num_heads)
                for t in self.kv(context.tokens.to(x.dtype)).chunk(2, dim=-1))  # [B, n, L, d]
        keep = context.mask[:, None, None, :]  # [B, 1, 1, L]: True = attend
        out = attend(q, k, v, keep, self, self.attn_processor)  # None: the fused kernel
        return x + self.proj(_merge(out))


class AdaLNZeroBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (DiT sec. 3.2, Fig. 3):

    ``(s1, b1, g1, s2, b2, g2) = Linear(SiLU(c))``;
    ``x += g1 * Attn(LN(x) (1 + s1) + b1)``; (text: ``x += CrossAttn(x, prompt)``);
    ``x += g2 * MLP(LN(x) (1 + s2) + b2)``.

    The modulation Linear (and the cross-attention's output) start at zero, so every gate is
    0 and the block is exactly the identity at initialisation."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float,
                 context_dim: int | None = None) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.cross = None if context_dim is None else TokenCrossAttention(dim, context_dim,
                                                                          num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: TextCond | None = None) -> Tensor:
        """x [B, N, D], c [B, D] (the conditioning vector) -> [B, N, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = self.cross(x, context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Adaptive LN then a Linear to ``p * p * out_channels`` per token; both the modulation
    and the Linear start at zero, so a fresh DiT outputs exactly zero."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x [B, N, D], c [B, D] -> [B, N, p * p * out]."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
