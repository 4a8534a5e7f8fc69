"""New tokens for a frozen text encoder, with trainable input embeddings (textual inversion).

Gal et al. 2022 ("An Image is Worth One Word", sec. 3.1): a placeholder word S* is added to
the tokenizer, its id looks up a new embedding vector v* instead of a row of the frozen
embedding table, and the rest of the encoder runs unchanged. :class:`TokenEncoder` does this
without touching the shared :class:`~difflab.text.TextEncoder`: it owns a copy of the
tokenizer with the new tokens added (ids from ``len(base tokenizer)`` on), and encodes a
prompt that contains one of them from input embeddings built differentiably from the given
rows, so the frozen encoder backpropagates to those rows only. A prompt without a new token
goes through the base encoder (and its cache), so it encodes exactly as before.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from ..conditioning import TextCond
from .encoder import TextEncoder

__all__ = ["TokenEncoder"]


class TokenEncoder:
    """``base`` extended by ``tokens``: ``encoder(prompts, rows) -> TextCond`` where
    ``rows[i]`` is the input embedding of ``tokens[i]`` (differentiable in ``rows``).

    Raises:
        ValueError: a token with spaces, one already in the base vocabulary, or one the
            tokenizer would not keep whole.
    """

    def __init__(self, base: TextEncoder, tokens: Sequence[str]):
        self.base, self.tokens = base, list(tokens)
        self.tokenizer = copy.deepcopy(base.tokenizer)  # the base's stays as it is
        self.first_id = len(base.tokenizer)
        vocab = base.tokenizer.get_vocab()
        for tok in self.tokens:
            if not tok or tok.split() != [tok]:
                raise ValueError(f"token {tok!r} must be one word without spaces")
            if tok in vocab or tok.lower() in vocab:
                raise ValueError(f"token {tok!r} is already a word of the text encoder's "
                                 "vocabulary; pick a new one such as '<my-shape>'")
        self.tokenizer.add_tokens(self.tokens)
        for i, tok in enumerate(self.tokens):
            ids = self.token_ids(tok)
            if ids != [self.first_id + i]:
                raise ValueError(f"token {tok!r} is not kept whole by the tokenizer (got ids "
                                 f"{ids}); pick another")

    def token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` with the new tokens, without [CLS]/[SEP]."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def has_token(self, prompt: str) -> bool:
        """Whether ``prompt`` contains one of the new tokens."""
        return any(i >= self.first_id for i in self.token_ids(prompt))

    def init_rows(self, words: Sequence[str]) -> Tensor:
        """Initial embeddings ``[len(words), D]``: each word's row of the frozen table (Gal et
        al. 2022 initialise v* from a coarse descriptor of the concept). Each word must be one
        token of the base vocabulary."""
        table = self.base.model.get_input_embeddings().weight
        rows = []
        for word in words:
            ids = self.base.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                pieces = self.base.tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(f"--init-word {word!r} must be one token of the text "
                                 f"encoder's vocabulary; it is {len(ids)}: {pieces}")
            rows.append(table[ids[0]].detach().float().clone())
        return torch.stack(rows)

    def _encode_new(self, prompt: str, rows: Tensor) -> Tensor:
        """``[L, D]`` of a prompt with new tokens: input embeddings = the frozen table's rows,
        with the new ids' replaced by ``rows``; then the frozen encoder as usual."""
        batch = self.tokenizer([prompt], truncation=True, max_length=self.base.max_length,
                               return_tensors="pt").to(self.base.device)
        ids = batch.pop("input_ids")
        table = self.base.model.get_input_embeddings()
        new = ids >= self.first_id
        emb = table(ids.clamp(max=self.first_id - 1))
        emb = torch.where(new[..., None], rows.to(emb)[(ids - self.first_id).clamp(min=0)], emb)
        return self.base.model(inputs_embeds=emb, **batch).last_hidden_state[0].float()

    def __call__(self, prompts: Sequence[str] | str, rows: Tensor) -> TextCond:
        """Token embeddings ``[B, L, D]`` and mask ``[B, L]`` as :class:`TextEncoder` gives;
        rows of prompts with a new token depend differentiably on ``rows``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if rows.shape[0] != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {rows.shape[0]} embedding rows")
        done: dict[str, Tensor] = {}
        for p in dict.fromkeys(prompts):
            if self.has_token(p):
                done[p] = self._encode_new(p, rows)
            else:
                cond = self.base([p])
                done[p] = cond.tokens[0, : int(cond.mask[0].sum())]
        out = [done[p] for p in prompts]
        length = max(len(r) for r in out)
        dev = self.base.device
        tokens = torch.stack([torch.cat([r, r.new_zeros(length - len(r), r.shape[1])])
                              for r in out])
        mask = torch.arange(length, device=dev)[None] < torch.tensor(
            [len(r) for r in out], device=dev)[:, None]
        return TextCond(tokens, mask)
