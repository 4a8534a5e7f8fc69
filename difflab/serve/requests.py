"""A client's form -> a validated :class:`JobRequest`.

Every field is checked here, before a job is queued: unknown model, mode or sampler, counts
and steps outside [1, limit], non-finite or out-of-range numbers (``nan``, ``inf``), a class
the model does not have, a prompt for a model without prompts, uploads that do not decode.
Each refusal is a ValueError with a one-line message naming the field.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import __version__
from ..pipeline import class_index
from ..samplers import SAMPLERS
from .images import read_image, read_mask
from .limits import ServeLimits
from .models import ServedModel

#: what a job does: sample from noise, SDEdit an upload, inpaint an upload under a mask
MODES: tuple[str, ...] = ("generate", "sdedit", "inpaint")
MAX_SEED = 2**32 - 1


@dataclass
class JobRequest:
    """One validated request. ``label`` None: every class in turn (class models);
    ``image`` [C, H, W] in [-1, 1] at the model's size and ``mask`` [1, 1, H, W] (1 =
    regenerate) for the edits; image i of the job uses seed ``seed + i``."""

    model: int
    mode: str
    sampler: str
    steps: int
    guidance: float
    seed: int
    count: int
    strength: float = 0.6
    label: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    image: Tensor | None = None
    mask: Tensor | None = None
    image_sha256: str | None = None

    def settings(self, model: ServedModel) -> dict[str, Any]:
        """The settings that made the images, as the JSON download gives them."""
        out: dict[str, Any] = {
            "difflab_version": __version__, "model": model.name, "mode": self.mode,
            "sampler": self.sampler if self.mode != "inpaint" else "ddim (eta=1, RePaint step)",
            "steps": self.steps, "guidance": self.guidance, "seed": self.seed,
            "count": self.count, "seeds": [self.seed + i for i in range(self.count)]}
        if model.conditioning == "class":
            names = model.pipe.class_names
            out["class"] = "all" if self.label is None else names[self.label]
        if model.conditioning == "text":
            out["prompt"] = self.prompt or ""
            out["negative_prompt"] = self.negative_prompt
        if self.mode == "sdedit":
            out["strength"] = self.strength
        if self.mode != "generate":
            out["input_sha256"] = self.image_sha256
        if self.mask is not None:
            out["mask_pixels"] = int(self.mask.sum())
        return out


def _text(form: Mapping[str, str], name: str) -> str:
    return str(form.get(name, "") or "").strip()


def _number(form: Mapping[str, str], name: str, kind: type, lo: float, hi: float,
            default: float | None = None) -> Any:
    """Field ``name`` as ``kind`` (int or float) in [lo, hi]; finite; ``default`` if empty."""
    raw = _text(form, name)
    if not raw:
        if default is None:
            raise ValueError(f"{name} is required")
        return kind(default)
    try:
        value = float(raw) if kind is float else int(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'a number' if kind is float else 'a whole number'}, "
                         f"got {raw[:40]!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {raw[:40]}")
    return value


def pick_model(value: str, models: Sequence[ServedModel]) -> int:
    """A model chosen by index or name -> its index (never a path)."""
    value = value.strip()
    names = [m.name for m in models]
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(models):
        return int(value)
    raise ValueError(f"unknown model {value[:60]!r}; choose from {names} (or their index)")


def _conditions(form: Mapping[str, str], model: ServedModel, guidance: float,
                limits: ServeLimits) -> dict[str, Any]:
    """label / prompt / negative_prompt for ``model``, refusing those it cannot take."""
    label_text, prompt = _text(form, "class"), _text(form, "prompt")
    negative = _text(form, "negative_prompt")
    cond = model.conditioning
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > limits.max_prompt_chars:
            raise ValueError(f"{name} is longer than {limits.max_prompt_chars} characters")
        if text and cond != "text":
            raise ValueError(f"{name}: model {model.name!r} takes no prompts")
    if negative and guidance == 1.0:
        raise ValueError("negative_prompt acts through classifier-free guidance: set guidance "
                         "other than 1")
    if label_text and label_text != "all" and cond != "class":
        raise ValueError(f"class: model {model.name!r} has no classes")
    label = None
    if label_text and label_text != "all":
        try:
            label = class_index(label_text, model.pipe.class_names)
        except ValueError:
            raise ValueError(f"class: unknown class {label_text[:40]!r}; model {model.name!r} "
                             f"has {model.pipe.class_names}") from None
    if guidance != 1.0 and not model.guided:
        raise ValueError(f"guidance: model {model.name!r} is unconditional; guidance must be 1")
    return {"label": label, "prompt": prompt if cond == "text" else None,
            "negative_prompt": negative or None}


def _uploads(mode: str, files: Mapping[str, bytes], model: ServedModel,
             limits: ServeLimits) -> dict[str, Any]:
    """The input image (and mask) of an edit, read at the model's image size."""
    if mode == "generate":
        return {}
    data = files.get("image")
    if data is None:
        raise ValueError(f"{mode} needs an image upload")
    c, h, w = model.pipe.image_shape
    out: dict[str, Any] = {"image": read_image(data, c, h, limits),
                           "image_sha256": hashlib.sha256(data).hexdigest()}
    if mode == "inpaint":
        if files.get("mask") is None:
            raise ValueError("inpaint needs a mask: paint over the part to regenerate")
        out["mask"] = read_mask(files["mask"], h, w, limits)
    return out


def parse_request(form: Mapping[str, str], files: Mapping[str, bytes],
                  models: Sequence[ServedModel], limits: ServeLimits) -> JobRequest:
    """Validate a client's form fields (strings) and uploads (bytes) into a request."""
    index = pick_model(_text(form, "model") or "0", models)
    model = models[index]
    mode = _text(form, "mode") or "generate"
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode[:40]!r}; choose from {list(MODES)}")
    default_sampler, default_steps, _ = model.pipe.default_sampler()
    sampler = _text(form, "sampler") or default_sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler[:40]!r}; choose from {sorted(SAMPLERS)}")
    count = _number(form, "count", int, 1, limits.max_count, 1)
    guidance = _number(form, "guidance", float, 0, limits.max_guidance, 1.0)
    return JobRequest(
        model=index, mode=mode, sampler=sampler, count=count, guidance=guidance,
        steps=_number(form, "steps", int, 1, limits.max_steps,
                      min(default_steps, limits.max_steps)),
        seed=_number(form, "seed", int, 0, MAX_SEED - count + 1, 0),
        strength=_number(form, "strength", float, 0, 1, 0.6),
        **_conditions(form, model, guidance, limits), **_uploads(mode, files, model, limits))
