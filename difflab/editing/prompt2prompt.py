"""Prompt-to-Prompt editing through cross-attention control (Hertz et al. 2022).

The source and the target prompt are sampled together, as one batch from the same initial
noise, with classifier-free guidance. In the cross-attention layers the target's attention
maps M*_t are edited from the source's M_t (Hertz et al. 2022, sec. 3.2, eq. for Edit):

- **word swap** (the prompts have as many words): M*_t := M_t for t in the replacement
  window, the target's own maps after it; a word split into a different number of
  WordPiece tokens shares its source word's attention equally (each row keeps sum 1);
- **refinement** (words added or removed): (M*_t)_{i,j} := (M_t)_{i,A(j)} for every target
  token j aligned to a source token A(j) (a longest common subsequence of the two token
  sequences), the target's own maps for new tokens;
- **re-weighting**: (M*_t)_{i,j} := c (M*_t)_{i,j} for the tokens j of the given words, at
  every step.

The replacement window is a fraction of the sampling steps counted from the noise end
(``cross_steps``); ``self_steps`` optionally injects the source's self-attention maps into
the target for the first steps too, which keeps the layout. The window is read from the
time of each network evaluation (``t > ts[int(f N)]``), so it works with every sampler, and
stochastic samplers get the same noise for both rows. Only the conditional half of the
guided batch is edited, as in the authors' code; the unconditional branch runs unchanged.

The networks layer provides the hook (``attn_processor`` of every attention block of a text
U-Net or text DiT, see :mod:`difflab.networks.cross_attention`); the edit is the controller
here. The tokenizer is the pipeline's (:attr:`~difflab.pipeline.Pipeline.tokenizer`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import TextCond
from ..guidance import ClassifierFreeGuidance
from ..networks.cross_attention import attention_blocks, attention_processor
from ..parameterization import ClippedDenoiser, DenoiserFn, Prediction
from ..process import as_time
from ..samplers import get_sampler
from ..samplers.base import check_grid
from ..samplers.generate import seed_generators
from .null_text import NullTextGuidance

Mode = Literal["auto", "replace", "refine"]
MODES: tuple[str, ...] = ("auto", "replace", "refine")


# -- tokens and alignment ----------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the text encoder sees it: token ids (with the special tokens, in the
    order of the embeddings) and each token's word index (None for a special token)."""

    prompt: str
    ids: tuple[int, ...]
    words: tuple[int | None, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def units(self) -> list[list[int]]:
        """Token positions grouped into words; every special token is a unit of its own."""
        out: list[list[int]] = []
        for pos, w in enumerate(self.words):
            if w is not None and pos > 0 and self.words[pos - 1] == w:
                out[-1].append(pos)
            else:
                out.append([pos])
        return out


def tokenize(tokenizer: Any, prompt: str, max_length: int = 32) -> PromptTokens:
    """The tokens of ``prompt`` exactly as the text encoder embeds them (truncated to
    ``max_length`` with the special tokens, as :class:`~difflab.text.TextEncoder` does).
    Words come from a fast tokenizer's ``word_ids``, else from WordPiece's ``##`` marks."""
    enc = tokenizer([prompt], truncation=True, max_length=max_length)
    ids = tuple(int(i) for i in enc["input_ids"][0])
    try:
        words = tuple(enc.word_ids(0))
    except (ValueError, AttributeError):  # a slow tokenizer: WordPiece continuation marks
        special = set(tokenizer.all_special_ids)
        pieces = tokenizer.convert_ids_to_tokens(list(ids))
        words, k = [], -1
        for i, piece in zip(ids, pieces, strict=True):
            if i in special:
                words.append(None)
                continue
            k += 0 if piece.startswith("##") and k >= 0 else 1
            words.append(k)
        words = tuple(words)
    return PromptTokens(prompt, ids, words)


def word_positions(tokenizer: Any, tokens: PromptTokens, word: str) -> list[int]:
    """Positions of the tokens of ``word`` (every occurrence) in ``tokens``; a ValueError
    when the word is not in the prompt."""
    piece = [int(i) for i in tokenizer([word], add_special_tokens=False)["input_ids"][0]]
    ids, n = tokens.ids, len(piece)
    found = [p for s in range(len(ids) - n + 1) if n and list(ids[s:s + n]) == piece
             for p in range(s, s + n)]
    if not found:
        raise ValueError(f"--reweight: word {word!r} is not in the prompt {tokens.prompt!r}")
    return found


@dataclass(frozen=True)
class EditMap:
    """How the target's cross-attention maps come from the source's: ``target_new =
    (source @ matrix) * alpha + target * (1 - alpha)`` over the key tokens; ``matrix``
    [L_src, L_tgt], ``alpha`` [L_tgt] (1: the token takes the source's map, 0: a new token
    keeps its own); ``mode`` is "replace" or "refine"."""

    matrix: Tensor
    alpha: Tensor
    mode: str


def replace_map(src: PromptTokens, tgt: PromptTokens) -> EditMap:
    """Word swap: the k-th word (or special token) of the source onto the k-th of the
    target; a word of |S| tokens onto one of |T| tokens spreads each source token's map
    evenly over the |T| target tokens (so every row still sums to 1)."""
    su, tu = src.units(), tgt.units()
    if len(su) != len(tu):
        raise ValueError(f"a word swap needs prompts of as many words: {src.prompt!r} has "
                         f"{len(su)} words and special tokens, {tgt.prompt!r} has {len(tu)}; "
                         "use --mode refine (or auto)")
    m = torch.zeros(len(src), len(tgt))
    for s_pos, t_pos in zip(su, tu, strict=True):
        if len(s_pos) == len(t_pos):
            m[s_pos, t_pos] = 1.0
        else:
            m[torch.tensor(s_pos)[:, None], torch.tensor(t_pos)[None, :]] = 1.0 / len(t_pos)
    return EditMap(m, torch.ones(len(tgt)), "replace")


def refine_map(src: PromptTokens, tgt: PromptTokens) -> EditMap:
    """Refinement: target tokens aligned to source tokens by a longest common subsequence of
    the token ids take the source's maps; the others (new words) keep their own."""
    m, alpha = torch.zeros(len(src), len(tgt)), torch.zeros(len(tgt))
    matcher = difflib.SequenceMatcher(None, src.ids, tgt.ids, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            m[a + k, b + k], alpha[b + k] = 1.0, 1.0
    return EditMap(m, alpha, "refine")


def edit_map(src: PromptTokens, tgt: PromptTokens, mode: Mode = "auto") -> EditMap:
    """The :class:`EditMap` of ``mode``; "auto": a word swap when the prompts have as many
    words, else a refinement."""
    if mode not in MODES:
        raise ValueError(f"unknown prompt-to-prompt mode {mode!r}; choose from {MODES}")
    if mode == "replace" or (mode == "auto" and len(src.units()) == len(tgt.units())):
        return replace_map(src, tgt)
    return refine_map(src, tgt)


# -- the controller --------------------------------------------------------------------------
def window_end(ts: Tensor, fraction: float, name: str = "cross_steps") -> float:
    """The time down to which a window of the first ``fraction`` of the steps of the
    decreasing grid ``ts`` lasts: a network evaluation at t is inside iff t > this."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    ts = check_grid(ts)
    n = len(ts) - 1
    k = int(math.floor(fraction * n + 1e-9))
    return float(ts[k]) if k < n else -math.inf  # the whole grid: every evaluation


class PromptToPromptControl:
    """Attention processor of a Prompt-to-Prompt edit of one source (batch row 0) into one
    target (row 1); further rows (the unconditional half of a guided batch, laid out as
    [conditional; unconditional]) pass unchanged.

    ``edit`` maps the source's cross-attention maps onto the target inside the window
    t > ``cross_until``; ``reweight`` [L_tgt] multiplies the target's maps at every step;
    the target takes the source's self-attention maps while t > ``self_until``. Set ``t``
    before each network call (:class:`ControlledDenoiser` does). With ``trace`` a list,
    every call appends (block, is_cross, t, the two edited rows' probabilities).
    """

    def __init__(self, edit: EditMap, cross_until: float, self_until: float = math.inf,
                 reweight: Tensor | None = None) -> None:
        self.edit, self.reweight = edit, reweight
        self.cross_until, self.self_until = cross_until, self_until
        self.t = math.inf
        self.trace: list[tuple[nn.Module, bool, float, Tensor]] | None = None

    @staticmethod
    def _fit(v: Tensor, length: int, like: Tensor) -> Tensor:
        """A [L] or [L, L] tensor zero-padded to ``length`` (the batch's key count)."""
        pad = [0, length - v.shape[-1]] + ([0, length - v.shape[0]] if v.ndim == 2 else [])
        return F.pad(v, pad).to(like)

    def __call__(self, block: nn.Module, probs: Tensor) -> Tensor:
        """probs [B, heads, Q, K] -> the same with row 1 edited from row 0."""
        if probs.shape[0] < 2:
            raise ValueError("prompt-to-prompt needs the source and the target in one batch")
        src, tgt = probs[0], probs[1]
        if block.is_cross:
            keys = probs.shape[-1]
            if self.t > self.cross_until:
                m = self._fit(self.edit.matrix, keys, probs)
                a = self._fit(self.edit.alpha, keys, probs)
                tgt = (src @ m) * a + tgt * (1 - a)
            if self.reweight is not None:
                tgt = tgt * self._fit(self.reweight, keys, probs)
        elif self.t > self.self_until:
            tgt = src
        out = torch.cat([probs[:1], tgt[None], probs[2:]])
        if self.trace is not None:
            self.trace.append((block, bool(block.is_cross), self.t, out[:2].detach().clone()))
        return out


class ControlledDenoiser:
    """``denoiser`` with the controller told the time of each evaluation (``control.t``)."""

    def __init__(self, denoiser: DenoiserFn, control: PromptToPromptControl) -> None:
        self.inner, self.control, self.process = denoiser, control, denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        self.control.t = float(as_time(t, x).flatten()[0])
        return self.inner(x, t, cond)


def reweight_vector(tokenizer: Any, tgt: PromptTokens, reweight: Mapping[str, float]
                    ) -> Tensor | None:
    """[L_tgt] factors: ``reweight[word]`` at the tokens of each word, 1 elsewhere."""
    if not reweight:
        return None
    v = torch.ones(len(tgt))
    for word, factor in reweight.items():
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"--reweight {word}={factor}: the factor must be >= 0")
        v[word_positions(tokenizer, tgt, word)] = float(factor)
    return v


def make_control(tokenizer: Any, source: str, target: str, ts: Tensor, *,
                 cross_steps: float = 0.8, self_steps: float = 0.0,
                 reweight: Mapping[str, float] | None = None, mode: Mode = "auto",
                 max_length: int = 32) -> PromptToPromptControl:
    """The controller of an edit of ``source`` into ``target`` on the grid ``ts``: maps
    between their tokens (``mode``), the windows as fractions of the steps, and factors
    for the target's words in ``reweight``."""
    src, tgt = tokenize(tokenizer, source, max_length), tokenize(tokenizer, target, max_length)
    return PromptToPromptControl(
        edit_map(src, tgt, mode), window_end(ts, cross_steps),
        window_end(ts, self_steps, "self_steps"),
        reweight_vector(tokenizer, tgt, reweight or {}))


def run_controlled(denoiser: DenoiserFn, net: nn.Module, control: PromptToPromptControl,
                   x_T: Tensor, ts: Tensor, cond: TextCond, sampler: str | Callable = "ddim",
                   seed: int = 0, **options: Any) -> Tensor:
    """Sample the source and target rows of ``cond`` [2 rows] from the same ``x_T`` [1, ...]
    with ``sampler`` on ``ts`` while ``control`` edits the attention of ``net``
    (the network inside ``denoiser``, a guided one whose batch is [cond; null]). Both rows
    get the same noise stream (seed ``seed``). Returns [2, ...]: source, edit."""
    if len(cond) != 2:
        raise ValueError(f"prompt-to-prompt samples 2 rows (source, target), got {len(cond)}")
    check_cross_attention(net)
    if x_T.shape[0] != 1:
        raise ValueError(f"x_T must hold one initial noise [1, ...], got {tuple(x_T.shape)}")
    x = x_T.expand(2, *x_T.shape[1:]).clone()
    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    gens = seed_generators([seed, seed], x.device)
    with torch.no_grad(), attention_processor(net, control):
        return fn(ControlledDenoiser(denoiser, control), x, ts, gens, cond=cond, **options)


def check_cross_attention(net: nn.Module) -> None:
    """Refuse a network without difflab cross-attention blocks to control (e.g. a diffusers
    U-Net run as diffusers' own module)."""
    if not any(getattr(m, "is_cross", False) for _, m in attention_blocks(net)):
        raise ValueError("prompt-to-prompt needs a network with difflab cross-attention to "
                         f"the prompt (a text U-Net or DiT); {type(net).__name__} has none")


# -- with a pipeline -------------------------------------------------------------------------
def guided_denoiser(pipe: Any, guidance: float, nulls: Sequence[TextCond] | None = None,
                    ts: Tensor | None = None) -> DenoiserFn:
    """A text pipeline's base denoiser with classifier-free guidance (the empty prompt as the
    null, or the per-step ``nulls`` of a null-text inversion on ``ts``), clipped to the
    data range as :meth:`Pipeline.denoiser` does."""
    if not pipe.is_text:
        raise ValueError("prompt-to-prompt needs a text-conditional model (trained with "
                         "prompts, e.g. --dataset shapes); this one is not")
    if pipe.stage.guidance_input:
        raise ValueError("prompt-to-prompt needs classifier-free guidance's two branches; "
                         "this model takes the guidance scale as an input")
    if nulls is not None:
        den: DenoiserFn = NullTextGuidance(pipe.base, guidance, nulls, ts)
    else:
        den = ClassifierFreeGuidance(pipe.base, guidance, null_cond=pipe.encode_prompts([""]))
    rng = pipe.stage.data_range
    return den if rng is None else ClippedDenoiser(den, *rng)


def prompt_to_prompt(pipe: Any, source: str, target: str, *, guidance: float = 5.0,
                     steps: int = 50, seed: int = 0, sampler: str = "ddim",
                     sampler_options: Mapping[str, Any] | None = None,
                     cross_steps: float = 0.8, self_steps: float = 0.0,
                     reweight: Mapping[str, float] | None = None, mode: Mode = "auto",
                     inversion: Any = None) -> Tensor:
    """Edit ``source`` into ``target`` with a text :class:`~difflab.pipeline.Pipeline`:
    returns images [2, C, H, W] (the source, the edit), decoded for a latent model.

    Without ``inversion`` the source is the sample of seed ``seed`` (the noise of
    ``pipe(prompt=source, seed=seed)``, on ``steps`` steps of ``sampler``). With a
    :class:`~difflab.editing.null_text.NullTextInversion` of a real image (made with the
    same prompt ``source``), its noise, grid, guidance and per-step null embeddings are
    used, so the source row reconstructs the image. ``guidance`` is the scale gamma."""
    if guidance < 1:
        raise ValueError(f"--guidance must be at least 1 for prompt-to-prompt, got {guidance}")
    check_cross_attention(pipe.net)
    from ..samplers import time_grid

    if inversion is not None:
        ts, nulls, guidance = inversion.ts, inversion.nulls, inversion.guidance
        x_T = inversion.x_T.to(pipe.device)
    else:
        ts, nulls = time_grid(pipe.process, steps), None
        g = seed_generators([seed], pipe.device)[0]
        sigma_max = float(pipe.process.sigma(ts[0]))
        x_T = sigma_max * torch.randn(tuple(pipe.sample_shape), generator=g,
                                      device=pipe.device)[None]
    tokenizer = pipe.tokenizer  # the encoder's, with the pipeline's learned tokens
    control = make_control(tokenizer, source, target, ts, cross_steps=cross_steps,
                           self_steps=self_steps, reweight=reweight, mode=mode)
    cond = pipe.encode_prompts([source, target])
    check_token_count(cond, control, source, target)
    den = guided_denoiser(pipe, guidance, nulls, ts)
    out = run_controlled(den, pipe.net, control, x_T, ts, cond, sampler, seed,
                         **dict(sampler_options or {}))
    return pipe.decode(out) if pipe.is_latent else out


def check_token_count(cond: TextCond, control: PromptToPromptControl, source: str,
                      target: str) -> None:
    """The tokenizer's counts must be the encoder's (the maps index the same tokens)."""
    counts = cond.mask.sum(1).tolist()
    want = [control.edit.matrix.shape[0], control.edit.matrix.shape[1]]
    if counts != want:
        raise ValueError(f"the tokenizer gives {want} tokens for {source!r} and {target!r} "
                         f"but the text encoder {counts}; prompts too long?")


__all__ = ["MODES", "ControlledDenoiser", "EditMap", "PromptToPromptControl", "PromptTokens",
           "check_cross_attention", "check_token_count", "edit_map", "guided_denoiser",
           "make_control", "prompt_to_prompt", "refine_map", "replace_map", "reweight_vector",
           "run_controlled", "tokenize", "window_end", "word_positions"]
