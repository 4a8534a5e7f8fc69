"""Adapter stages: how each kind of adapter modifies a pipeline's diffusion network.

An adapter stage (``StageCard.kind`` in :data:`~difflab.pipeline.card.ADAPTER_KINDS`) is built
like any stage, as a network from its card and weights, and then *applied* to the pipeline by
the function registered here for its kind: LoRA adds low-rank updates to the diffusion
network's layers, a ControlNet wraps the network so that a control image steers it, learned
token embeddings extend the text encoder's vocabulary. Each function receives the pipeline,
the stage (its ``scale`` is the adapter's strength) and the stage's built module, and may
replace ``pipe.net``; the pipeline rebuilds its denoiser afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .card import StageCard
from .controlnet import apply_controlnet
from .embeddings import apply_embeddings
from .lora import apply_lora

__all__ = ["ADAPTERS", "AdapterApply", "apply_adapter"]

#: ``fn(pipe, stage, module)``; ``pipe`` is the :class:`~difflab.pipeline.Pipeline` (typed
#: ``Any`` here because this module sits below it)
AdapterApply = Callable[[Any, StageCard, nn.Module], None]

#: stage kind -> the function that applies such a stage to a pipeline
ADAPTERS: dict[str, AdapterApply] = {
    "lora": apply_lora,
    "embeddings": apply_embeddings,
    "controlnet": apply_controlnet,
}


def apply_adapter(pipe: Any, stage: StageCard, module: nn.Module) -> None:
    """Apply one adapter stage to ``pipe`` (a ValueError if its kind has no function)."""
    fn = ADAPTERS.get(stage.kind)
    if fn is None:
        raise ValueError(f"stage {stage.name!r}: this difflab cannot apply {stage.kind!r} "
                         f"adapters (it knows {sorted(ADAPTERS)})")
    fn(pipe, stage, module)
