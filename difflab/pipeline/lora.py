"""LoRA adapter stages (``StageCard.kind == "lora"``): how a saved LoRA is applied to a
pipeline, merged into its weights and undone (Hu et al. 2021; the module is
:class:`difflab.networks.lora.LoRA`).

A LoRA stage's network is ``"lora"`` with a :class:`~difflab.networks.lora.LoRAConfig` (rank,
alpha, the adapted layers' names and shapes) and its ``A``/``B`` factors as weights; applying
it attaches it to the pipeline's diffusion network (the stage's own network, also under a
ControlNet wrapper) with strength ``stage.scale``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..networks.lora import LoRA, LoRAHandle
from .card import StageCard

__all__ = ["apply_lora", "diffusion_network", "lora_handles"]


def diffusion_network(pipe: Any) -> nn.Module:
    """The diffusion stage's own network (``pipe.net`` may be a wrapper around it)."""
    kinds = [s.kind for s in pipe.card.stages]
    return pipe.networks[kinds.index("diffusion")]


def apply_lora(pipe: Any, stage: StageCard, module: nn.Module) -> None:
    """Attach the LoRA ``module`` of ``stage`` to ``pipe``'s diffusion network with strength
    ``stage.scale``; a LoRA made for other layers is a ValueError naming the stage and layer."""
    if not isinstance(module, LoRA):
        raise ValueError(f"lora stage {stage.name!r}: its network is {stage.network!r}, "
                         "not 'lora'")
    try:
        module.attach(diffusion_network(pipe), stage.scale)
    except ValueError as e:
        raise ValueError(f"lora stage {stage.name!r} does not fit this model: {e}") from None


def lora_handles(pipe: Any) -> list[tuple[int, LoRAHandle]]:
    """(stage index, handle) of each attached LoRA stage of ``pipe``, in stage order."""
    return [(i, net.handle) for i, (s, net) in enumerate(zip(pipe.card.stages, pipe.networks,
                                                              strict=True))
            if s.kind == "lora" and isinstance(net, LoRA) and net.handle is not None]
