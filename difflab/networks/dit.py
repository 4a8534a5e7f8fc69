"""Diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

The image (or latent) is cut into ``p x p`` patches, each linearly embedded as a token with a
fixed 2-D sine-cosine position embedding; ``depth`` adaLN-Zero transformer blocks process the
tokens, conditioned on one vector c = time embedding (+ class embedding, + pooled prompt, +
guidance-scale embedding); a final adaptive-LN layer maps each token back to a patch.
Class conditioning reserves the null label ``num_classes`` for classifier-free guidance, and
text conditioning adds cross-attention to the prompt tokens in every block, both as in
difflab's :class:`~difflab.networks.unet.UNet`, whose call signature this shares.

Sizes (:data:`DIT_SIZES`, DiT Table 1): S, B, L, XL, plus ``tiny`` for CPU tests; a model is
named size/patch, e.g. DiT-S/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab.conditioning import GuidanceCond, TextCond
from difflab.config import option
from difflab.networks.cross_attention import pooled_context
from difflab.networks.dit_layers import (
    AdaLNZeroBlock,
    FinalLayer,
    patchify,
    sincos_position_embedding,
    unpatchify,
)
from difflab.networks.embeddings import broadcast_c_noise, resolve_labels, timestep_embedding
from difflab.networks.unet import GUIDANCE_EMBED_SCALE

__all__ = ["DIT_SIZES", "DiT", "DiTConfig", "TIME_FREQUENCIES"]

#: Width of the sinusoidal features of c_noise (and of the guidance scale) before their MLP.
TIME_FREQUENCIES = 256

#: Size presets: hidden_size, depth, num_heads (DiT Table 1; ``tiny`` for CPU tests).
DIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "depth": 4, "num_heads": 4},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}


@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`DiT` (JSON-serialisable via ``dataclasses.asdict``);
    the defaults are DiT-S/2 on 32x32x4 latents (256 px images through an f = 8 autoencoder).

    Attributes:
        in_channels: channels of the input.
        out_channels: output channels; ``None`` means ``in_channels`` (2C: a learned
            variance in the second half, as for the U-Net).
        image_size: nominal (square) input size; fixes the stored position embedding (other
            sizes divisible by ``patch_size`` work too, with an embedding computed per call).
        patch_size: side p of the square patches (tokens = (H/p) * (W/p)).
        hidden_size: token width D (divisible by ``num_heads`` and by 4).
        depth: number of adaLN-Zero blocks.
        num_heads: attention heads.
        mlp_ratio: width of each block's MLP relative to D.
        num_classes: if set, class-conditional with labels ``0..num_classes - 1`` and the
            null label ``num_classes`` (classifier-free guidance).
        context_dim: if set, text-conditional: every block cross-attends to prompt tokens of
            this width (a :class:`~difflab.conditioning.TextCond`), and their masked mean is
            added to the conditioning vector.
        guidance_embedding: if True, the guidance scale w (a :class:`~difflab.conditioning.
            GuidanceCond`) is embedded too, by an MLP whose last layer starts at zero.
    """

    in_channels: int = option(4, "input channels (set from the data)", cli=False)
    out_channels: int | None = option(None, "output channels; None: in_channels (set from the "
                                            "objective)", cli=False)
    image_size: int = option(32, "nominal input size (set from the data)", cli=False)
    patch_size: int = option(2, "DiT patch size p (tokens = (H/p) * (W/p); 2, 4 or 8 in the "
                                "paper)", ge=1)
    hidden_size: int = option(384, "DiT token width", flag="--dit-hidden-size", ge=4)
    depth: int = option(12, "DiT blocks", flag="--dit-depth", ge=1)
    num_heads: int = option(6, "DiT attention heads", flag="--dit-heads", ge=1)
    mlp_ratio: float = option(4.0, "DiT MLP width / token width", flag="--dit-mlp-ratio", gt=0)
    num_classes: int | None = option(None, "class labels 0..K-1 plus a null label (set from "
                                           "the data)", cli=False)
    context_dim: int | None = option(None, "width of prompt tokens for cross-attention (set "
                                           "from the text encoder)", cli=False)
    guidance_embedding: bool = option(False, "take the guidance scale as an input", cli=False)

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "patch_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 or None, got {self.out_channels}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide the image size "
                             f"{self.image_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads="
                             f"{self.num_heads} and by 4 (the 2-D position embedding)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("num_classes", "context_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.context_dim is not None and self.num_classes is not None:
            raise ValueError("a DiT is either class- or text-conditional, not both")

    @property
    def resolved_out_channels(self) -> int:
        """``out_channels``, defaulting to ``in_channels``."""
        return self.in_channels if self.out_channels is None else self.out_channels


def _init_linear(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear in ``module`` (as DiT does)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _zero(*modules: nn.Module) -> None:
    for module in modules:
        for p in module.parameters():
            nn.init.zeros_(p)


class DiT(nn.Module):
    """Diffusion transformer: ``forward(x [B, C, H, W], c_noise [B], cond) -> [B, out, H, W]``
    with H, W divisible by ``patch_size``; ``cond`` as for the U-Net (labels [B] | None, a
    TextCond | None, or a GuidanceCond of either).

    Freshly built, every block is the identity and the output is exactly zero (adaLN-Zero)."""

    def __init__(self, config: DiTConfig | None = None) -> None:
        super().__init__()
        cfg = DiTConfig() if config is None else config
        self.config = cfg
        self.out_channels = cfg.resolved_out_channels
        #: validate label ranges on every call (a host sync; the trainer turns it off)
        self.check_labels = True
        #: recompute each block's activations in backward (less memory, more compute)
        self.grad_checkpointing = False
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Linear(p * p * cfg.in_channels, d)  # = a conv, kernel = stride = p
        grid = cfg.image_size // p
        self.register_buffer("pos_embed", sincos_position_embedding(d, grid, grid),
                             persistent=False)  # [N, D], fixed
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, d), nn.SiLU(), nn.Linear(d, d))
        self.label_emb = None if cfg.num_classes is None else nn.Embedding(cfg.num_classes + 1, d)
        self.context_emb = None if cfg.context_dim is None else nn.Linear(cfg.context_dim, d)
        self.guidance_mlp = None if not cfg.guidance_embedding else nn.Sequential(
            nn.Linear(TIME_FREQUENCIES, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(AdaLNZeroBlock(d, cfg.num_heads, cfg.mlp_ratio,
                                                   cfg.context_dim) for _ in range(cfg.depth))
        self.final = FinalLayer(d, p, self.out_channels)
        self._initialise()

    def _initialise(self) -> None:
        """DiT's initialisation (sec. 3.2 and its code): Xavier Linears, N(0, 0.02) time MLP
        and class table, then zero for every modulation, the final layer, the cross-attention
        outputs and the guidance MLP's last layer (adaLN-Zero)."""
        _init_linear(self)
        for m in self.time_mlp[::2]:
            nn.init.normal_(m.weight, std=0.02)
        if self.label_emb is not None:
            nn.init.normal_(self.label_emb.weight, std=0.02)
        for block in self.blocks:
            _zero(block.modulation)
            if block.cross is not None:
                _zero(block.cross.proj)
        _zero(self.final.modulation, self.final.linear)
        if self.guidance_mlp is not None:
            _zero(self.guidance_mlp[-1])

    @property
    def null_label(self) -> int | None:
        """The reserved classifier-free-guidance label (``num_classes``), or ``None``."""
        return self.config.num_classes

    def embed(self, c_noise: Tensor, cond: Any, batch: int, w: Tensor | None = None) -> Tensor:
        """The conditioning vector c [B, D]: time (+ class | pooled prompt, + guidance w)."""
        c_noise = broadcast_c_noise(c_noise, batch)
        c = self.time_mlp(timestep_embedding(c_noise, TIME_FREQUENCIES))
        if self.guidance_mlp is not None:
            if w is None:
                raise ValueError("this network takes the guidance scale as an input: give a "
                                 "GuidanceCond (Pipeline.denoiser(guidance=w) does)")
            w = broadcast_c_noise(w.to(device=c.device, dtype=torch.float32), batch)
            c = c + self.guidance_mlp(timestep_embedding(w * GUIDANCE_EMBED_SCALE,
                                                         TIME_FREQUENCIES)).to(c.dtype)
        elif w is not None:
            raise ValueError("a guidance scale given to a network built without "
                             "guidance_embedding")
        if self.context_emb is not None:
            if cond is not None:
                c = c + self.context_emb(pooled_context(cond).to(c.dtype))
        elif isinstance(cond, TextCond):
            raise ValueError("a prompt given to a model built without context_dim")
        elif self.label_emb is not None:
            labels = resolve_labels(cond, batch, self.config.num_classes, c_noise.device,
                                    check_range=self.check_labels)
            c = c + self.label_emb(labels)
        elif cond is not None:
            raise ValueError("labels given to a model built without num_classes")
        return c

    def position_embedding(self, grid_h: int, grid_w: int, like: Tensor) -> Tensor:
        """[N, D] for a ``grid_h x grid_w`` patch grid (the stored one at the nominal size)."""
        n = self.config.image_size // self.config.patch_size
        pos = self.pos_embed if (grid_h, grid_w) == (n, n) else \
            sincos_position_embedding(self.config.hidden_size, grid_h, grid_w)
        return pos.to(device=like.device, dtype=like.dtype)

    def forward(self, x: Tensor, c_noise: Tensor,
                cond: Tensor | TextCond | GuidanceCond | None = None) -> Tensor:
        """Predict from noisy ``x [B, in_channels, H, W]`` at noise conditioning ``c_noise``
        ([B] or a scalar); ``cond``: labels [B] in ``[0, num_classes]`` (``num_classes`` and
        ``None`` are the null label), a TextCond of B rows (``None``: no prompt), or a
        GuidanceCond of either with w [B]. Returns ``[B, out_channels, H, W]``."""
        cfg = self.config
        b, _, h, w_ = x.shape if x.ndim == 4 else (0, 0, 0, 0)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or h % cfg.patch_size \
                or w_ % cfg.patch_size:
            raise ValueError(f"x must have shape [B, {cfg.in_channels}, H, W] with H and W "
                             f"divisible by patch_size={cfg.patch_size}, got {tuple(x.shape)}")
        w = None
        if isinstance(cond, GuidanceCond):
            cond, w = cond.cond, cond.w
        c = self.embed(c_noise, cond, b, w)  # [B, D]
        p = cfg.patch_size
        tokens = self.patch_embed(patchify(x, p))  # [B, N, D]
        tokens = tokens + self.position_embedding(h // p, w_ // p, tokens)
        context = cond if isinstance(cond, TextCond) else None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, use_reentrant=False)
            else:
                tokens = block(tokens, c, context)
        out = self.final(tokens, c)  # [B, N, p * p * out]
        return unpatchify(out, p, h, w_)

