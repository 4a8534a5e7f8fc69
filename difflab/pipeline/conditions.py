"""What a pipeline's samples are conditioned on: class labels or prompts, one row per image.

Class labels are given as an index, a class name, a list of them, or ``"all"`` (rows of every
class); prompts as a string or a list (a row of images per prompt), encoded with the text
encoder the model was trained with. The result, :class:`Conditions`, slices like a batch, so
a sharded run can condition every rank on its own part of the same set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import TextCond

#: default number of images: per class for "all", per prompt, and otherwise
PER_CLASS, PER_PROMPT, DEFAULT_N, DEFAULT_NROW = 10, 8, 64, 8

LabelSpec = int | str | Sequence[int | str] | Tensor | None


@dataclass
class Conditions:
    """One condition per image: ``cond`` is what the denoiser receives (class labels [n],
    a :class:`TextCond` of n rows, or None), ``labels`` the class index of each image
    (None for unconditional and text models), ``prompts`` the prompt of each image."""

    n: int
    nrow: int
    cond: Tensor | TextCond | None = None
    labels: Tensor | None = None
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, part: slice) -> Conditions:
        """The conditions of images ``part`` (a slice), e.g. one rank's shard."""
        idx = range(self.n)[part]
        return Conditions(
            n=len(idx), nrow=self.nrow,
            cond=None if self.cond is None else self.cond[part],
            labels=None if self.labels is None else self.labels[part],
            prompts=None if self.prompts is None else self.prompts[part])


def class_index(label: int | str, class_names: list[str]) -> int:
    """A class given as a name or an index (int or digit string) -> the index."""
    k = len(class_names)
    if k == 0:
        raise ValueError("--class given but the model is unconditional")
    if isinstance(label, str) and label in class_names:
        return class_names.index(label)
    text = str(label)
    if text.lstrip("-").isdigit() and 0 <= int(text) < k:
        return int(text)
    raise ValueError(f"unknown --class {label!r}; classes are 0..{k - 1}: {class_names}")


def class_conditions(labels: LabelSpec, n: int | None, class_names: list[str]) -> Conditions:
    """Per-image class labels. ``"all"``: rows of every class (n defaults to 10 per class);
    one class: n (default 64) images of it; a list or tensor: one image per entry; None: no
    label (the null condition of a class-conditional model, or an unconditional model)."""
    k = len(class_names)
    if labels is None or (k == 0 and isinstance(labels, str) and labels == "all"):
        n = DEFAULT_N if n is None else n
        return Conditions(n=n, nrow=DEFAULT_NROW)
    if k == 0:
        raise ValueError("--class given but the model is unconditional")
    if isinstance(labels, str) and labels == "all":
        n = PER_CLASS * k if n is None else n
        nrow = -(-n // k)
        y = torch.arange(n) % k if n < k else torch.arange(k).repeat_interleave(nrow)[:n]
        return Conditions(n=n, nrow=nrow, cond=y, labels=y)
    if isinstance(labels, int | str):
        n = DEFAULT_N if n is None else n
        y = torch.full((n,), class_index(labels, class_names))
        return Conditions(n=n, nrow=DEFAULT_NROW, cond=y, labels=y)
    items = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if n is not None and n != len(items):
        raise ValueError(f"n={n} disagrees with the {len(items)} labels given")
    y = torch.tensor([class_index(v, class_names) for v in items], dtype=torch.long)
    return Conditions(n=len(y), nrow=DEFAULT_NROW, cond=y, labels=y)


def prompt_list(prompt: str | Sequence[str] | None, n: int | None) -> tuple[list[str], int]:
    """Each image's prompt (n images in rows of one prompt; n defaults to 8 per prompt; no
    prompt is the empty prompt, the trained null) and the row length."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
    if n is None:
        per = PER_PROMPT
    elif n % len(prompts):
        raise ValueError(f"n={n} images is not a multiple of the {len(prompts)} prompts")
    else:
        per = n // len(prompts)
    return [p for p in prompts for _ in range(per)], per


def _text_encoder(source: str, device: str) -> Any:
    from .. import text  # optional extra: imported only for text models

    # a Stable Diffusion folder (pipeline.diffusers_in): its CLIP encoder and tokenizer
    factory = text.CLIPPromptEncoder if text.is_clip_folder(source) else text.TextEncoder
    return _encoder_of(factory, source, device)


@lru_cache(maxsize=4)
def _encoder_of(factory: Any, source: str, device: str) -> Any:
    # keyed by the encoder class too, so an encoder made by a stand-in class (a test's) is
    # never handed out once the real class is back, nor the other way round
    return factory(source, device=device)


def shared_text_encoder(source: str, device: torch.device | str = "cpu") -> Any:
    """The :class:`~difflab.text.TextEncoder` of ``source`` that pipelines on ``device``
    share (loaded once; never modified: new tokens go to a :class:`~difflab.text.TokenEncoder`
    over it)."""
    return _text_encoder(source, str(torch.device(device)))


def _token_encoder(source: str, device: str, tokens: tuple[str, ...]) -> Any:
    """The shared encoder of ``source`` extended by ``tokens`` (its own tokenizer copy: the
    shared encoder, and every other pipeline using it, stays as it is)."""
    return _token_encoder_over(_text_encoder(source, device), tokens)


@lru_cache(maxsize=8)
def _token_encoder_over(encoder: Any, tokens: tuple[str, ...]) -> Any:
    from ..text import TokenEncoder

    return TokenEncoder(encoder, tokens)


def prompt_tokenizer(text_encoder: str | None, device: torch.device | str = "cpu",
                     embeddings: Sequence[nn.Module] = ()) -> Any:
    """The tokenizer :func:`encode_prompts` uses with the same arguments: the shared
    encoder's, or with learned token ``embeddings`` its :class:`~difflab.text.TokenEncoder`
    copy with their tokens added (the same object, so nothing is loaded twice)."""
    if not text_encoder:
        raise ValueError("a tokenizer needs a text-conditional model (trained on captioned "
                         "data such as --dataset shapes); this one is not")
    dev = str(torch.device(device))
    if not embeddings:
        return _text_encoder(text_encoder, dev).tokenizer
    tokens = tuple(t for m in embeddings for t in m.tokens)
    return _token_encoder(text_encoder, dev, tokens).tokenizer


def encode_prompts(text_encoder: str | None, prompts: list[str],
                   device: torch.device | str = "cpu",
                   embeddings: Sequence[nn.Module] = ()) -> TextCond:
    """Token embeddings of ``prompts`` with ``text_encoder`` (the one a text model was trained
    with; the encoder is loaded once per device and caches every prompt it has seen).

    ``embeddings``: learned token embeddings (:class:`~difflab.networks.TokenEmbeddings`,
    textual inversion) whose tokens the prompts may use; prompts without them encode as
    without."""
    if not text_encoder:
        raise ValueError("--prompt needs a text-conditional model (trained on captioned data "
                         "such as --dataset shapes); this one is not")
    dev = str(torch.device(device))
    if not embeddings:
        return _text_encoder(text_encoder, dev)(prompts)
    tokens = tuple(t for m in embeddings for t in m.tokens)
    rows = torch.cat([m.weight.detach().float().to(dev) for m in embeddings])
    with torch.no_grad():
        return _token_encoder(text_encoder, dev, tokens)(prompts, rows)
