"""What the fine-tuning images are conditioned on: prompts (text models), class labels
(class models) or nothing, as labels into one table that also holds DreamBooth's class prompt
and the null condition (the empty prompt, or the null label) that prompt dropout uses.

Text models: every image's prompt is ``--instance-prompt`` when given (DreamBooth: "a sks
shape"; textual inversion: default the new token alone), otherwise its caption. With textual
inversion the table is re-encoded at every step from the token's current embedding, so the
loss reaches it through the frozen encoder (Gal et al. 2022, eq. 2). Class models: the images
are bound to the class ``--instance-prompt`` names, or keep their own labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import TextCond
from ..data import ImageData
from ..networks import TokenEmbeddings, TokenEmbeddingsConfig
from ..pipeline import Pipeline, class_index
from ..pipeline.conditions import shared_text_encoder
from .finetune_config import FinetuneConfig
from .text import CaptionTable

__all__ = ["ConditionTable", "make_conditions"]


@dataclass
class ConditionTable:
    """Labels of the training images into a table of conditions.

    ``kind``: "text", "class" or "none". Text: ``prompts`` are the table's rows and row
    ``len(prompts)`` is the empty prompt (``null_index``); class: labels are the model's
    classes, ``null_index`` its null label."""

    kind: str
    instance_labels: Tensor | None
    null_index: int | None = None
    class_label: int | None = None
    prompts: list[str] = field(default_factory=list)
    encoder: Any = None            # TextEncoder (text models)
    tokens: Any = None             # TokenEncoder (textual inversion)
    token_config: TokenEmbeddingsConfig | None = None
    _fixed: CaptionTable | None = None

    def table(self, module: nn.Module) -> Callable[[Tensor | None], Any]:
        """labels [B] -> the denoiser's condition, for the trained ``module``."""
        if self.kind == "class":
            return lambda y: y
        if self.kind == "none":
            return lambda y: None
        if self.tokens is None:
            if self._fixed is None:
                self._fixed = CaptionTable(self.encoder, self.prompts,
                                           self.instance_labels.device)
            return self._fixed
        cond = self.tokens(self.prompts + [""], module())  # differentiable in the row
        return lambda y: TextCond(cond.tokens[y], cond.mask[y])

    def token_module(self) -> TokenEmbeddings:
        """The new token's embedding, initialised from ``--init-word``'s row."""
        assert self.token_config is not None and self.tokens is not None
        module = TokenEmbeddings(self.token_config)
        with torch.no_grad():
            module.weight.copy_(self.tokens.init_rows(self.token_config.init_words))
        return module.to(self.instance_labels.device)

    def captions(self, base: list[str]) -> list[str]:
        """The prompts trained on (a text model's card lists them), else ``base``."""
        return list(self.prompts) if self.kind == "text" else list(base)

    def sample_prompts(self) -> list[str]:
        """Up to 8 distinct prompts trained on (instance prompts first)."""
        return self.prompts[:8]

    def sample_labels(self) -> list[int]:
        """The distinct class labels trained on (instance, then class)."""
        assert self.instance_labels is not None
        seen = dict.fromkeys(self.instance_labels.tolist())
        if self.class_label is not None:
            seen[self.class_label] = None
        return list(seen)[:8]


def make_conditions(pipe: Pipeline, data: ImageData, config: FinetuneConfig,
                    device: torch.device) -> ConditionTable:
    """The condition table of ``data`` for the base ``pipe`` (see the module docstring)."""
    d = config.dreambooth
    if pipe.is_text:
        return _text_conditions(pipe, data, config, device)
    if pipe.class_names:
        names = pipe.class_names
        labels = _class_labels(data, names, d.instance_prompt)
        label = None if d.class_prompt is None else class_index(d.class_prompt, names)
        return ConditionTable("class", labels.to(device), len(names), label)
    if d.instance_prompt is not None or d.class_prompt is not None:
        raise ValueError("--instance-prompt and --class-prompt need a class- or "
                         "text-conditional base model; this one is unconditional")
    return ConditionTable("none", None)


def _class_labels(data: ImageData, names: list[str], instance: str | None) -> Tensor:
    if instance is not None:
        return torch.full((len(data),), class_index(instance, names), dtype=torch.long)
    if data.labels is None or not set(data.class_names) <= set(names):
        raise ValueError("a class-conditional base model needs --instance-prompt LABEL (the "
                         "class the images are bound to) or data labelled with its classes "
                         f"({names})")
    index = torch.tensor([names.index(n) for n in data.class_names], dtype=torch.long)
    return index[data.labels]


def _text_conditions(pipe: Pipeline, data: ImageData, config: FinetuneConfig,
                     device: torch.device) -> ConditionTable:
    d, m = config.dreambooth, config.method
    encoder = shared_text_encoder(pipe.stage.text_encoder, device)
    tokens = token_config = None
    if m.textual_inversion is not None:
        from ..text import TokenEncoder

        tokens = TokenEncoder(encoder, [m.textual_inversion])
        token_config = TokenEmbeddingsConfig(
            tokens=[m.textual_inversion], dim=encoder.dim, init_words=[m.init_word],
            text_encoder=pipe.stage.text_encoder)
        per_image = [d.instance_prompt or m.textual_inversion] * len(data)
        if not tokens.has_token(per_image[0]):
            raise ValueError(f"--instance-prompt {per_image[0]!r} does not contain the token "
                             f"{m.textual_inversion!r} being learned")
    elif d.instance_prompt is not None:
        per_image = [d.instance_prompt] * len(data)
    else:
        per_image = _captions(data)
    prompts = list(dict.fromkeys(per_image + ([d.class_prompt] if d.class_prompt else [])))
    labels = torch.tensor([prompts.index(p) for p in per_image], dtype=torch.long)
    label = None if d.class_prompt is None else prompts.index(d.class_prompt)
    return ConditionTable("text", labels.to(device), len(prompts), label, prompts, encoder,
                          tokens, token_config)


def _captions(data: ImageData) -> list[str]:
    """Each image's caption (captioned data: labels index captions)."""
    captions = getattr(data, "captions", None)
    if captions is None:
        raise ValueError("a text base model needs captioned data (e.g. a folder with a "
                         "metadata.jsonl) or --instance-prompt")
    return list(captions)
