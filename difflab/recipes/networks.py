"""The denoiser network of a diffusion run: which one, and the config fields the data fix.

The run config holds each network's own config (``network.unet``, ``network.mlp``, ...) under
its registry name; ``network.name`` picks one (default: ``unet`` for images, ``mlp`` for 2-D
points). Fields that follow from the data and the objective are set by name wherever the
chosen config has them, so a new network needs no code here: its module, its registry line in
:mod:`difflab.networks`, and its config as a group of :class:`~difflab.recipes.config.
NetworkConfig`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from ..networks import NETWORKS


def denoiser_name(network: Any, sample_ndim: int) -> str:
    """The network a run trains: ``network.name``, else unet for images, mlp for points."""
    name = network.name or ("unet" if sample_ndim == 3 else "mlp")
    if name not in NETWORKS or not hasattr(network, name):
        groups = [f.name for f in fields(network) if f.name in NETWORKS]
        raise ValueError(f"unknown --network {name!r}; choose from {groups}")
    return name


def network_config(name: str, arch: Any, sample_shape: tuple[int, ...],
                   learned_variance: bool, num_classes: int | None,
                   context_dim: int | None) -> Any:
    """``arch`` with the fields the data and the objective fix, where it has them:
    ``in_channels``/``dim`` (channels of an image, or the dimension of a point),
    ``image_size`` (the resolution), ``out_channels`` (twice the channels for a learned
    variance: the second half is v, Nichol & Dhariwal 2021), ``num_classes`` (class labels)
    and ``context_dim`` (the width of prompt tokens; a text model takes no class labels)."""
    have = {f.name for f in fields(arch)}
    channels = sample_shape[0]
    if ("image_size" in have) != (len(sample_shape) == 3):
        data = "images" if len(sample_shape) == 3 else "2-D points"
        raise ValueError(f"--network {name} does not take {data}; choose "
                         f"{'unet' if len(sample_shape) == 3 else 'mlp'} (or leave --network "
                         "unset)")
    if learned_variance and "out_channels" not in have:
        raise ValueError(f"a learned-variance objective needs image data and a network with "
                         f"a variance output (out_channels, e.g. unet); {name} has none")
    if context_dim is not None and "context_dim" not in have:
        raise ValueError(f"captioned data needs a text-conditional network (context_dim, "
                         f"e.g. unet); {name} has none")
    derived: dict[str, Any] = {
        "in_channels": channels, "dim": channels,
        "out_channels": 2 * channels if learned_variance else None,
        "num_classes": None if context_dim is not None else num_classes,
        "context_dim": context_dim}
    if len(sample_shape) == 3:
        derived["image_size"] = sample_shape[-1]
    return replace(arch, **{k: v for k, v in derived.items() if k in have})
