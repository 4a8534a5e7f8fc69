"""Read a diffusers-format ``AutoencoderKL`` folder (e.g. a Stable Diffusion VAE on disk) as a
difflab :class:`~difflab.networks.autoencoder.Autoencoder`.

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or the ``.fp16``
variant); a whole pipeline folder with a ``vae/`` sub-folder works too. Only safetensors are
read: pickled ``.bin`` weights can run code when loaded and are refused. Configurations the
difflab network cannot reproduce exactly (other block types, per-channel latent statistics,
other activations) are refused with a one-line error naming the file and the key.

Usage::

    config, state = load_diffusers_autoencoder("sd-vae")
    vae = Autoencoder(config); vae.load_state_dict(state)
    scale, shift = diffusers_scaling("sd-vae")      # model latent = (z - shift) * scale
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.io import LoadError, load_state, read_json, read_safetensors
from difflab.networks.autoencoder import Autoencoder, AutoencoderConfig

__all__ = [
    "convert_diffusers_config",
    "convert_diffusers_state",
    "diffusers_scaling",
    "load_diffusers_autoencoder",
    "weights_file",
]

CONFIG = "config.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PICKLES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")

#: diffusers config key -> (difflab field, diffusers' default when the key is absent)
FIELDS: dict[str, tuple[str, Any]] = {
    "in_channels": ("in_channels", 3),
    "out_channels": ("out_channels", 3),
    "block_out_channels": ("block_out_channels", (64,)),
    "layers_per_block": ("layers_per_block", 1),
    "latent_channels": ("latent_channels", 4),
    "norm_num_groups": ("norm_num_groups", 32),
    "mid_block_add_attention": ("mid_attention", True),
    "use_quant_conv": ("use_quant_conv", True),
    "use_post_quant_conv": ("use_post_quant_conv", True),
}
#: keys that do not change the network (checked or read elsewhere, or inference hints)
IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
           "sample_size", "force_upcast", "scaling_factor", "shift_factor", "down_block_types",
           "up_block_types", "act_fn", "latents_mean", "latents_std"}

#: diffusers state-dict key patterns -> difflab names (applied in order, first match wins)
_RENAMES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.resnets."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.resample.conv."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.up.\1.resnets."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.up.\1.resample.conv."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.res1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.res2."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]]
#: attention projections: current diffusers names and the older (deprecated) ones
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
              "query": "q", "key": "k", "value": "v", "proj_attn": "out"}
_ATTENTION_KEY = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$")


def _folder(folder: str | Path) -> Path:
    """``folder``, or its ``vae/`` sub-folder when it is a whole diffusers pipeline."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder}: no such diffusers autoencoder folder")
    if not (folder / CONFIG).exists() and (folder / "vae" / CONFIG).exists():
        return folder / "vae"
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        config = read_json(path)
    except FileNotFoundError:
        raise LoadError(f"{path}: missing (a diffusers AutoencoderKL folder holds config.json "
                        f"and {WEIGHTS[0]})") from None
    if not isinstance(config, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def convert_diffusers_config(config: dict[str, Any], source: str = CONFIG) -> AutoencoderConfig:
    """The :class:`AutoencoderConfig` of a diffusers ``AutoencoderKL`` config dict; anything
    difflab cannot honour is a one-line LoadError (a ValueError) naming ``source`` and the
    key."""
    def refuse(key: str, why: str) -> LoadError:
        return LoadError(f"{source}: {key}={config.get(key)!r} is not supported ({why})")

    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise refuse("_class_name", "only AutoencoderKL folders are read")
    unknown = sorted(set(config) - set(FIELDS) - IGNORED)
    if unknown:
        raise refuse(unknown[0], "an AutoencoderKL option difflab does not know")
    if config.get("act_fn", "silu") not in ("silu", "swish"):
        raise refuse("act_fn", "the difflab autoencoder uses SiLU")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise refuse(key, "per-channel latent statistics; difflab scales by one factor")
    values = {ours: config.get(theirs, default) for theirs, (ours, default) in FIELDS.items()}
    count = len(values["block_out_channels"] or ())
    for key, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
        types = config.get(key, [block])
        if not isinstance(types, (list, tuple)) or any(t != block for t in types):
            raise refuse(key, f"only {block} blocks")
        if len(types) != count:
            raise refuse(key, f"one per block_out_channels entry ({count})")
    try:
        return AutoencoderConfig(**values)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{source}: {e}") from None


def diffusers_scaling(folder: str | Path) -> tuple[float, float]:
    """(scale, shift) of a diffusers autoencoder folder: ``scaling_factor`` (default 0.18215)
    and ``shift_factor`` (null: 0); the diffusion model's latent is (z - shift) * scale."""
    folder = _folder(folder)
    config = _read_config(folder)
    scale, shift = config.get("scaling_factor", 0.18215), config.get("shift_factor") or 0.0
    for key, value in (("scaling_factor", scale), ("shift_factor", shift)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoadError(f"{folder / CONFIG}: {key}={value!r} must be a number")
    if scale <= 0:
        raise LoadError(f"{folder / CONFIG}: scaling_factor={scale!r} must be > 0")
    return float(scale), float(shift)


def convert_diffusers_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` tensor names -> difflab :class:`Autoencoder` names; 1x1-conv
    shaped attention projections [C, C, 1, 1] (old checkpoints) become linear [C, C]."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        m = _ATTENTION_KEY.match(key)
        if m and m.group(2) in _ATTENTION:
            name = _ATTENTION[m.group(2)]
            if name != "norm" and tensor.ndim == 4:
                tensor = tensor.flatten(1)
            key = f"{m.group(1)}.mid.attn.{name}.{m.group(3)}"
        else:
            for pattern, replacement in _RENAMES:
                key, n = pattern.subn(replacement, key)
                if n:
                    break
            key = key.replace(".conv_shortcut.", ".shortcut.")
        out[key] = tensor
    return out


def weights_file(folder: Path) -> Path:
    """The safetensors weights of a diffusers model folder; pickles are refused."""
    for name in WEIGHTS:
        if (folder / name).exists():
            return folder / name
    for name in PICKLES:
        if (folder / name).exists():
            raise LoadError(f"{folder / name}: pickled PyTorch weights are not loaded (they can "
                            f"run code); save the model with safe_serialization=True")
    raise LoadError(f"{folder / WEIGHTS[0]}: missing")


def load_diffusers_autoencoder(folder: str | Path) -> tuple[AutoencoderConfig, dict[str, Tensor]]:
    """(config, state dict) of the diffusers ``AutoencoderKL`` in ``folder``, ready for
    ``Autoencoder(config).load_state_dict(state)``, in float32 (also from an ``.fp16`` file).
    Names and shapes are checked against the network built from the config; every problem is
    one LoadError (a ValueError) naming the file. See :func:`diffusers_scaling` for the latent
    scale and shift."""
    folder = _folder(folder)
    config = convert_diffusers_config(_read_config(folder), str(folder / CONFIG))
    path = weights_file(folder)
    state = {k: v.float() if v.is_floating_point() else v  # fp16 / bf16 files: float32
             for k, v in convert_diffusers_state(read_safetensors(path)).items()}
    with torch.device("meta"):  # names and shapes only; no memory, no initialisation cost
        network = Autoencoder(config)
    with warnings.catch_warnings():  # copying into meta tensors is a (warned) no-op
        warnings.filterwarnings("ignore", message=".*meta parameter", category=UserWarning)
        load_state(network, state, str(path), what=f"its {CONFIG}")
    return config, state
