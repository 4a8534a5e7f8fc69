"""Loading an autoencoder stage from any of the places one comes from.

A latent diffusion model (Rombach et al. 2022) needs an image autoencoder. It can be

- a ``difflab train-autoencoder`` run folder, its ``checkpoints/`` folder or one checkpoint
  (the checkpoint metadata's ``autoencoder`` entry says what the network is and holds the
  latent scale factor estimated on the training data);
- a pipeline folder whose model card has an autoencoder stage (a saved latent model);
- a diffusers-format ``AutoencoderKL`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, e.g. a Stable Diffusion VAE on disk), converted by
  :mod:`difflab.networks.diffusers_vae`; its ``scaling_factor`` and ``shift_factor`` are kept.

:func:`load_autoencoder` returns the stage card (``sample_shape`` is the training images'
where known; a latent recipe sets it to its own data's) and the network, frozen, in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import from_dict, to_dict
from ..io import LoadError, read_json
from ..networks import build_network
from ..training.checkpoint import read_checkpoint_meta, resolve_checkpoint
from .card import CARD_FILE, ModelCard, StageCard
from .loading import build_stage_network, stage_weights

__all__ = ["AUTOENCODER_STAGE", "autoencoder_downsampling", "is_diffusers_autoencoder",
           "load_autoencoder"]

#: the name an autoencoder stage gets in a card
AUTOENCODER_STAGE = "autoencoder"
#: the config file of a diffusers model folder
DIFFUSERS_CONFIG = "config.json"


def is_diffusers_autoencoder(path: str | Path) -> bool:
    """``path`` is a diffusers model folder (a ``config.json`` with diffusers'
    ``_class_name``, unlike a difflab run's), or a diffusers pipeline folder with a ``vae/``
    one."""
    p = Path(path)
    if not p.is_dir() or (p / CARD_FILE).is_file():
        return False
    if (p / "vae" / DIFFUSERS_CONFIG).is_file():
        return True
    if not (p / DIFFUSERS_CONFIG).is_file():
        return False
    try:
        config = read_json(p / DIFFUSERS_CONFIG)
    except LoadError:
        return False
    return isinstance(config, dict) and "_class_name" in config


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu",
                     ema: bool = True) -> tuple[StageCard, nn.Module]:
    """(stage card, frozen network on ``device``) of the autoencoder at ``path``: a
    ``train-autoencoder`` run or checkpoint (``ema``: its EMA weights, else the raw ones), a
    pipeline folder with an autoencoder stage, or a diffusers ``AutoencoderKL`` folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"autoencoder {p} does not exist")
    if is_diffusers_autoencoder(p):
        return _from_diffusers(p, device)
    if p.is_dir() and (p / CARD_FILE).is_file():
        card = ModelCard.load(p / CARD_FILE)
        stage = card.stage_of("autoencoder")
        if stage is None:
            raise ValueError(f"{p / CARD_FILE} has no autoencoder stage")
        return stage, build_stage_network(stage, stage_weights(stage, p, {}), device,
                                          channels_last=False, root=p)
    ckpt = resolve_checkpoint(p)
    stage = autoencoder_stage_of_meta(read_checkpoint_meta(ckpt), ckpt, ema)
    net = build_stage_network(stage, stage_weights(stage, ckpt.parent, {}), device,
                              channels_last=False, root=ckpt.parent)
    return stage, net


def autoencoder_downsampling(path: str | Path) -> int | None:
    """The down-sampling factor f of the autoencoder at ``path``, read from its JSON alone
    (no weights); None when it cannot be read (loading it then reports why)."""
    p = Path(path)
    try:
        if is_diffusers_autoencoder(p):
            folder = p if (p / DIFFUSERS_CONFIG).is_file() else p / "vae"
            widths = read_json(folder / DIFFUSERS_CONFIG)["block_out_channels"]
        elif p.is_dir() and (p / CARD_FILE).is_file():
            stage = ModelCard.load(p / CARD_FILE).stage_of("autoencoder")
            widths = stage.network_config["block_out_channels"] if stage else None
        else:
            meta = read_checkpoint_meta(resolve_checkpoint(p))
            widths = meta["autoencoder"]["network_config"]["block_out_channels"]
        return 2 ** (len(widths) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def autoencoder_stage_of_meta(meta: dict[str, Any], ckpt: Path, ema: bool = True
                              ) -> StageCard:
    """The stage card of a ``train-autoencoder`` checkpoint's metadata (``ckpt``: its file,
    named in errors)."""
    ae = meta.get("autoencoder")
    if not isinstance(ae, dict):
        raise LoadError(f"checkpoint {ckpt} is not an autoencoder (train one with 'difflab "
                        "train-autoencoder', or give a diffusers AutoencoderKL folder)")
    prefix = ".".join(filter(None, ("ema" if ema else "model", ae.get("weights_prefix", ""))))
    fields = {k: ae[k] for k in ("network", "network_config", "sample_shape", "data_range",
                                 "scale_factor", "shift_factor") if k in ae}
    return from_dict(StageCard, {
        **fields, "name": AUTOENCODER_STAGE, "kind": "autoencoder",
        "weights": ckpt.with_suffix(".safetensors").name, "weights_prefix": prefix,
        "dataset": meta.get("dataset")}, f"autoencoder metadata of {ckpt}")


def _from_diffusers(folder: Path, device: torch.device | str) -> tuple[StageCard, nn.Module]:
    """A diffusers AutoencoderKL folder as a stage (its weights converted to difflab's names;
    the stage's ``weights`` names the folder, for reference)."""
    from ..networks.diffusers_vae import diffusers_scaling, load_diffusers_autoencoder

    config, state = load_diffusers_autoencoder(folder)
    scale, shift = diffusers_scaling(folder)
    network_config = to_dict(config)
    net = build_network("autoencoder", network_config)
    net.load_state_dict(state)
    raw = read_json(folder / DIFFUSERS_CONFIG) if (folder / DIFFUSERS_CONFIG).is_file() else {}
    size = raw.get("sample_size") or 256
    size = int(size[0] if isinstance(size, list) else size)
    stage = StageCard(
        name=AUTOENCODER_STAGE, kind="autoencoder", network="autoencoder",
        network_config=network_config, sample_shape=[net.config.in_channels, size, size],
        weights=str(folder), data_range=[-1.0, 1.0], scale_factor=scale, shift_factor=shift)
    return stage, net.to(device).eval().requires_grad_(False)
