"""Reading and writing what a pipeline is made of: cards, stage weights, noisy classifiers,
and the feature extractors of ``difflab eval`` (which may be a noisy classifier).

A source is a pipeline folder (``model_card.json`` + safetensors), a training run folder, its
``checkpoints/`` folder, or one checkpoint's ``step_*.json`` / ``.safetensors`` (the latest
checkpoint for folders). Checkpoints are converted to a card on the fly
(:meth:`ModelCard.from_checkpoint_meta`), so run folders written before pipelines existed load
unchanged; so are diffusers model folders (:func:`~difflab.pipeline.diffusers_in.diffusers_card`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..evaluation import (
    ModuleExtractor,
    NoisyClassifierFeatures,
    builtin_feature_net,
    load_feature_net,
    load_fid_inception,
    parse_features,
)
from ..evaluation.builtin import BUILTIN_STEPS
from ..evaluation.featurenet import FEATURE_NET_KINDS
from ..io import LoadError, atomic_write, load_state, read_json, read_safetensors
from ..networks import build_network
from ..process import Process, process_from_config
from ..training.checkpoint import (
    load_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
    sub_dict,
)
from .card import CARD_FILE, ModelCard, StageCard
from .diffusers_in import diffusers_card, is_diffusers_folder

#: how many cards deep ``base`` may point (an adapter on an adapter on ... a model)
MAX_BASE_DEPTH = 8


def read_source(path: str | Path, ema: bool | None = None) -> tuple[ModelCard, Path]:
    """(card, folder its weight files are relative to) of a pipeline folder or checkpoint.

    ``ema``: for a checkpoint, EMA weights unless False; for a pipeline folder, None accepts
    the weights it holds and a value that disagrees with them is an error. A card with a
    ``base`` (adapters saved alone) comes back joined to its base's stages, every weights
    file then named by its absolute path; ``ema`` applies to the adapters, the base gives
    the weights it would give by itself."""
    card, root, _, _ = read_joined(path, ema)
    return card, root


def read_joined(path: str | Path, ema: bool | None = None, _depth: int = 0
                ) -> tuple[ModelCard, Path, Path, int]:
    """:func:`read_source`'s (card, root), and the complete model under ``path`` with its
    number of stages: ``path`` itself when its card needs no base, else its ``base``
    followed to the end (whose stages come first in the joined card)."""
    card, root = _read_one(path, ema)
    if card.base is None:
        return card, root, Path(path), len(card.stages)
    if _depth >= MAX_BASE_DEPTH:
        raise LoadError(f"{path}: more than {MAX_BASE_DEPTH} base models deep (a cycle?)")
    base_path = Path(card.base).expanduser()
    base_path = base_path if base_path.is_absolute() else root / base_path
    try:
        base, base_root, complete, n_base = read_joined(base_path, None, _depth + 1)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"base model of {path} not found: {e}") from None
    stages = [StageCard(**{**vars(s), "weights": str((r / s.weights).resolve())})
              for stages, r in ((base.stages, base_root), (card.stages, root)) for s in stages]
    joined = ModelCard(**{**vars(card), "stages": stages, "base": None})
    return joined, root, complete, n_base


def read_adapters(path: str | Path, ema: bool | None = None) -> list[tuple[StageCard, Path]]:
    """The adapter stages saved at ``path`` (a card with a ``base``, or any card's adapter
    stages), each with the folder its weights file is relative to; none is a ValueError."""
    card, root = _read_one(path, ema)
    if not card.adapters:
        raise ValueError(f"{path} holds no adapter stages (LoRA, ControlNet or token "
                         "embeddings)")
    return [(s, root) for s in card.adapters]


def _read_one(path: str | Path, ema: bool | None) -> tuple[ModelCard, Path]:
    p = Path(path)
    if p.is_dir() and (p / CARD_FILE).is_file():
        card = ModelCard.load(p / CARD_FILE)
        if ema is not None and ema != card.ema:
            raise ValueError(f"{p} holds {'EMA' if card.ema else 'raw (non-EMA)'} weights "
                             f"only; {'EMA' if ema else 'raw'} weights were asked for")
        return card, p
    if is_diffusers_folder(p):  # a diffusers pipeline or U-Net folder: its card on the fly
        if ema is False:
            raise ValueError(f"{p} is a diffusers folder with one set of weights; raw "
                             "(non-EMA) weights were asked for")
        return diffusers_card(p)
    ckpt = resolve_checkpoint(p)
    meta = read_checkpoint_meta(ckpt)
    try:
        card = ModelCard.from_checkpoint_meta(
            meta, weights=ckpt.with_suffix(".safetensors").name, ema=ema is not False)
    except (KeyError, TypeError, ValueError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"is not usable: {e}"
        raise LoadError(f"checkpoint {ckpt} {what}") from None
    return card, ckpt.parent


def stage_weights(stage: StageCard, root: Path,
                  cache: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The state dict of ``stage`` from its weights file under ``root`` (files read once)."""
    file = root / stage.weights
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} of stage {stage.name!r} not found")
    if stage.weights not in cache:
        cache[stage.weights] = read_safetensors(file)
    tensors = cache[stage.weights]
    weights = sub_dict(tensors, stage.weights_prefix) if stage.weights_prefix else tensors
    if not weights:
        raise ValueError(f"{file} has no {stage.weights_prefix or 'stage'} weights")
    return weights


def build_stage_network(stage: StageCard, weights: dict[str, torch.Tensor],
                        device: torch.device | str = "cpu", channels_last: bool = True,
                        root: Path | None = None) -> nn.Module:
    """The stage's network with ``weights``, on ``device``, in eval mode without gradients.
    With ``channels_last`` its 4-d weights are NHWC, so it computes in that layout whatever
    its input's (as training does by default; about 1.4x faster on the CPU for the U-Net).
    Weights of other names or shapes are a LoadError naming the file (under ``root``)."""
    net = build_network(stage.network, stage.network_config)
    file = Path(root or ".") / stage.weights
    source = f"{file}" + (f" ({stage.weights_prefix} tensors)" if stage.weights_prefix else "")
    load_state(net, weights, source, f"the {stage.network} config of stage {stage.name!r}")
    net.to(device).eval().requires_grad_(False)
    if channels_last:
        net.to(memory_format=torch.channels_last)  # only 4-d weights change
    return net


def write_stage_weights(net: nn.Module, file: Path) -> None:
    """Save a network's state dict (contiguous CPU tensors) atomically as safetensors."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(file, lambda tmp: save_file(tensors, tmp))


@dataclass
class LoadedClassifier:
    """A noisy classifier p_phi(y | x_t, t) (``difflab train-classifier``) and its process."""

    net: nn.Module
    process: Process
    class_names: list[str]


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> LoadedClassifier:
    """A noisy classifier (``difflab train-classifier``: its run folder, ``checkpoints/`` or
    one checkpoint's .json / .safetensors), in eval mode without gradients, on ``device``."""
    tensors, meta = load_checkpoint(path)
    file = resolve_checkpoint(path)
    try:
        name, config = meta["network"]["name"], meta["network"]["config"]
        process, class_names = process_from_config(meta["process"]), list(meta["class_names"])
    except (KeyError, TypeError) as e:
        raise LoadError(f"{file} is not a noisy classifier checkpoint: it lacks {e}") from None
    if name != "classifier":
        raise ValueError(f"{path} is a {name!r} checkpoint, not a classifier (train one with "
                         "'difflab train-classifier')")
    net = build_network("classifier", config)
    load_state(net, sub_dict(tensors, "model"), str(file.with_suffix(".safetensors")))
    return LoadedClassifier(net.to(device).eval().requires_grad_(False), process, class_names)


def _refuse_feature_net(path: Path) -> None:
    """A feature network's file given as ``classifier:`` is told apart from a bad checkpoint."""
    js = path.with_suffix(".json") if path.suffix in (".json", ".safetensors") else None
    if js is not None and js.is_file():
        meta = read_json(js)
        if isinstance(meta, dict) and meta.get("kind") in FEATURE_NET_KINDS:
            raise ValueError(f"{js} is a feature network, not a noisy classifier: use "
                             f"--features featurenet:{js}")


def load_extractor(spec: str, device: torch.device | str = "cpu", *,
                   dataset: str | None = None, resolution: int | None = None,
                   channels: int | None = None,
                   builtin_steps: int = BUILTIN_STEPS) -> ModuleExtractor:
    """The feature extractor named by ``spec`` (``--features``, see
    :mod:`difflab.evaluation.features`). ``builtin`` without a data set uses ``dataset``;
    the built-in network is made for ``resolution`` x ``resolution`` images of ``channels``."""
    kind, arg = parse_features(spec)
    if kind == "inception":
        return ModuleExtractor(load_fid_inception(arg, device),
                               f"inception-v3-fid ({Path(arg).name})", device)
    if kind == "featurenet":
        model, _ = load_feature_net(arg)
        return ModuleExtractor(model.to(device), f"featurenet ({Path(arg).name})", device)
    if kind == "classifier":
        _refuse_feature_net(Path(arg))
        clf = load_classifier(arg, device)
        return ModuleExtractor(NoisyClassifierFeatures(clf.net, clf.process).to(device),
                               f"classifier ({Path(arg).name})", device)
    name = arg or dataset
    if not name:
        raise ValueError("the built-in features need a data set: give --reference as a data "
                         "set (digits:test, folder:PATH), or --features builtin:DATASET")
    if resolution is None or channels is None:
        raise ValueError("the built-in features need the images' resolution and channels")
    model, label = builtin_feature_net(name, resolution, channels, builtin_steps)
    return ModuleExtractor(model.to(device), label, device)
