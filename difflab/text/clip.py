"""The CLIP text encoder of a Stable Diffusion folder, read from disk (never downloaded).

Stable Diffusion (Rombach et al. 2022, sec. 3.3 and appendix) conditions its U-Net on the last
hidden states of CLIP's text transformer (Radford et al. 2021) for the prompt tokenised to the
tokenizer's full length (77 tokens), padding included and no attention mask: the U-Net was
trained on all of them. :class:`CLIPPromptEncoder` reproduces that: ``encoder(prompts)`` is a
:class:`~difflab.conditioning.TextCond` of ``[B, 77, D]`` tokens whose mask is all True, and
the empty prompt encodes the unconditional branch of classifier-free guidance.

The folder holds ``text_encoder/`` (``config.json`` + ``model.safetensors`` of a
``CLIPTextModel``) and ``tokenizer/`` (a ``CLIPTokenizer``'s files). Pickled weights are
refused; loading sets ``local_files_only`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..conditioning import TextCond
from ..io import LoadError
from .encoder import cached_rows

__all__ = ["CLIPPromptEncoder", "is_clip_folder"]

WEIGHTS = ("model.safetensors", "model.fp16.safetensors")


def is_clip_folder(source: str | Path) -> bool:
    """``source`` is a folder with ``text_encoder/config.json`` and ``tokenizer/``."""
    p = Path(source).expanduser()
    return (p / "text_encoder" / "config.json").is_file() and (p / "tokenizer").is_dir()


def _check_weights(folder: Path) -> None:
    if any((folder / w).is_file() for w in WEIGHTS):
        return
    if any(f.suffix == ".bin" for f in folder.iterdir()):
        raise LoadError(f"{folder}: pickled PyTorch weights are not loaded (they can run "
                        "code); save the text encoder with safe_serialization=True")
    raise LoadError(f"{folder / WEIGHTS[0]}: missing")


class CLIPPromptEncoder:
    """Frozen CLIP prompt encoder: ``encoder(prompts) -> TextCond`` ([B, L, D] last hidden
    states at the tokenizer's ``model_max_length`` L, mask all True).

    Args:
        source: a folder with ``text_encoder/`` and ``tokenizer/`` (a Stable Diffusion one).
        device: where the encoder runs and the embeddings are returned.
    """

    def __init__(self, source: str | Path, device: str | torch.device = "cpu"):
        root = Path(source).expanduser()
        if not is_clip_folder(root):
            raise LoadError(f"{root}: not a CLIP text encoder folder (text_encoder/config.json "
                            "and tokenizer/)")
        _check_weights(root / "text_encoder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach out for a missing file
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise LoadError("a Stable Diffusion folder's text encoder needs transformers: pip "
                            "install 'difflab[diffusers]'") from None
        from transformers.utils import logging as hf_logging

        self.source, self.device = str(source), torch.device(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"),
                                                       local_files_only=True)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every command
        try:
            variant = None if (root / "text_encoder" / WEIGHTS[0]).is_file() else "fp16"
            model = CLIPTextModel.from_pretrained(str(root / "text_encoder"), variant=variant,
                                                  local_files_only=True, use_safetensors=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model = model.float().to(self.device).eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.max_length = int(min(self.tokenizer.model_max_length,
                                  model.config.max_position_embeddings))
        self._cache: dict[str, Tensor] = {}  # prompt -> [L, D]

    def input_ids(self, prompts: Sequence[str]) -> Tensor:
        """Token ids ``[B, L]``, padded (and truncated) to L = ``max_length`` as Stable
        Diffusion's pipeline does."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Tensor:
        ids = self.input_ids([prompt]).to(self.device)
        return self.model(ids).last_hidden_state[0].float()  # [L, D]

    def __call__(self, prompts: Sequence[str] | str) -> TextCond:
        """Token embeddings ``[B, L, D]`` and an all-True mask ``[B, L]``."""
        tokens = torch.stack(cached_rows(self._cache, prompts, self._encode_one))
        return TextCond(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool,
                                           device=tokens.device))
