"""Applying a learned-token-embeddings stage (textual inversion, Gal et al. 2022) to a
pipeline: prompts that contain one of its tokens are then encoded with its embeddings.

The stage's module is a :class:`~difflab.networks.TokenEmbeddings`; applying it appends the
module to ``pipe.token_embeddings``, which :meth:`Pipeline.encode_prompts` hands to
:func:`~difflab.pipeline.conditions.encode_prompts`. The shared text encoder is not changed,
so other pipelines that use the same encoder do not see the new tokens.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .card import StageCard

__all__ = ["apply_embeddings"]


def apply_embeddings(pipe: Any, stage: StageCard, module: nn.Module) -> None:
    """Make ``pipe`` encode prompts with the tokens of ``module`` (scale 1; scale 0 leaves
    the pipeline as it is)."""
    if stage.scale == 0:
        return
    if stage.scale != 1:
        raise ValueError(f"embeddings stage {stage.name!r}: token embeddings take scale 1 "
                         f"(or 0: off), got {stage.scale}")
    if not pipe.is_text:
        raise ValueError(f"embeddings stage {stage.name!r} needs a text-conditional model; "
                         "this one is not")
    own = getattr(module, "config", None)
    enc = getattr(own, "text_encoder", None)
    if enc is not None and enc != pipe.stage.text_encoder:
        raise ValueError(f"embeddings stage {stage.name!r} was learned for text encoder "
                         f"{enc!r}; this model uses {pipe.stage.text_encoder!r}")
    taken = {t for m in pipe.token_embeddings for t in m.tokens}
    clash = sorted(taken & set(module.tokens))
    if clash:
        raise ValueError(f"embeddings stage {stage.name!r}: tokens {clash} are already "
                         "defined by another embeddings stage")
    pipe.token_embeddings.append(module)
