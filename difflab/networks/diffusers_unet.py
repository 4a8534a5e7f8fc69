"""diffusers' own networks as difflab networks: ``UNet2DModel``, ``UNet2DConditionModel`` and
``AutoencoderKL`` run unchanged, behind difflab's calling conventions.

A difflab denoiser network is called as ``net(x, c_noise, cond)`` with ``c_noise`` the
process time scaled to [0, 1000] (``Process.c_noise``: for a discrete process of T steps,
``c_noise = t * 1000 / T`` with t the DDPM step index, t = 0 the data). diffusers' U-Nets take
the scheduler's timestep instead, an index into ``alphas_cumprod`` that starts at 0 for the
first noisy step: ``timestep = t - 1``. :class:`DiffusersUNet` converts once, in float64, so
the U-Net sees exactly the timesteps diffusers' pipelines pass (integers on integer grids).

The wrapped module's sub-modules are registered on the wrapper itself, so its state dict
carries diffusers' own tensor names: a ``diffusion_pytorch_model.safetensors`` loads as it is
and ``save_pretrained`` writes it back unchanged. diffusers is an optional extra
(``pip install 'difflab[diffusers]'``), imported only when such a network is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from difflab.conditioning import TextCond, split_guidance
from difflab.io import LoadError

__all__ = ["DiffusersAutoencoder", "DiffusersAutoencoderConfig", "DiffusersUNet",
           "DiffusersUNetConfig", "import_diffusers"]

UNetClass = Literal["UNet2DModel", "UNet2DConditionModel"]


def import_diffusers() -> Any:
    """The ``diffusers`` module, or a one-line LoadError naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise LoadError("diffusers models need the optional extra: pip install "
                        "'difflab[diffusers]'") from None
    return diffusers


class _Adopted(nn.Module):
    """Holds a diffusers module whose children, parameters and buffers are registered on this
    wrapper under their own names (the state dict keys are diffusers')."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.__dict__["model"] = model  # not a sub-module: its parts are ours already

    def train(self, mode: bool = True) -> _Adopted:
        super().train(mode)
        self.model.training = mode
        return self


@dataclass
class DiffusersUNetConfig:
    """A diffusers U-Net: its class, its own ``config.json`` (as the class's ``from_config``
    takes it) and the T of the discrete process it was trained with."""

    model_class: UNetClass = "UNet2DModel"
    config: dict[str, Any] = field(default_factory=dict)
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.model_class not in ("UNet2DModel", "UNet2DConditionModel"):
            raise ValueError(f"model_class must be UNet2DModel or UNet2DConditionModel, got "
                             f"{self.model_class!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got "
                             f"{self.num_train_timesteps}")


class DiffusersUNet(_Adopted):
    """``forward(x [B, C, H, W], c_noise [B], cond) -> [B, C', H, W]`` through a diffusers
    U-Net at ``timestep = c_noise * T / 1000 - 1`` (module docstring). ``cond``: None for a
    ``UNet2DModel``; a :class:`~difflab.conditioning.TextCond` (its tokens as
    ``encoder_hidden_states``; a mask with padding as ``encoder_attention_mask``) for a
    ``UNet2DConditionModel``."""

    def __init__(self, config: DiffusersUNetConfig):
        diffusers = import_diffusers()
        cls = getattr(diffusers, config.model_class)
        super().__init__(cls.from_config(dict(config.config)))
        self.config = config
        self.text = config.model_class == "UNet2DConditionModel"

    def timesteps(self, c_noise: Tensor) -> Tensor:
        """diffusers' timestep of difflab's ``c_noise`` (float32, exact for integer steps)."""
        t = c_noise.double() * (self.config.num_train_timesteps / 1000.0)
        return (t - 1.0).float()

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        cond, w = split_guidance(cond)
        if w is not None:
            raise ValueError("a diffusers U-Net takes no guidance scale input")
        ts = self.timesteps(c_noise.reshape(-1).expand(x.shape[0]) if c_noise.numel() == 1
                            else c_noise)
        if not self.text:
            return self._forward_2d(x, ts, cond)
        if not isinstance(cond, TextCond):
            raise ValueError("a diffusers UNet2DConditionModel needs prompt embeddings "
                             "(a TextCond) as its condition")
        tokens = cond.tokens.to(x.dtype)
        mask = None if bool(cond.mask.all()) else cond.mask
        return self.model(x, ts, encoder_hidden_states=tokens,
                          encoder_attention_mask=mask).sample

    def _forward_2d(self, x: Tensor, ts: Tensor, cond: Any) -> Tensor:
        """A ``UNet2DModel``: unconditional, or class labels [B] (long) as ``class_labels``."""
        labelled = self.model.config.num_class_embeds is not None
        if not labelled:
            if cond is not None:
                raise ValueError("this diffusers UNet2DModel is unconditional; got a "
                                 "condition")
            return self.model(x, ts).sample
        if not isinstance(cond, Tensor) or cond.dtype != torch.long:
            raise ValueError("this diffusers UNet2DModel is class-conditional: its condition "
                             "is a tensor of integer labels")
        return self.model(x, ts, class_labels=cond.reshape(-1).expand(x.shape[0])).sample


@dataclass
class DiffusersAutoencoderConfig:
    """A diffusers ``AutoencoderKL``: its own ``config.json``."""

    config: dict[str, Any] = field(default_factory=dict)


class DiffusersAutoencoder(_Adopted):
    """diffusers' ``AutoencoderKL`` with difflab's autoencoder calls: ``encode(x)`` -> the
    posterior (``.mode()``, ``.sample(generator)``), ``decode(z)`` -> images; unscaled
    latents z (the pipeline applies ``scaling_factor``)."""

    def __init__(self, config: DiffusersAutoencoderConfig):
        diffusers = import_diffusers()
        super().__init__(diffusers.AutoencoderKL.from_config(dict(config.config)))
        self.config = config

    def encode(self, x: Tensor) -> Any:
        return self.model.encode(x).latent_dist

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z).sample

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x).mode())

