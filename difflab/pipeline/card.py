"""The model card: one typed JSON file that says what each stage of a saved model is.

A pipeline folder holds ``model_card.json`` and one safetensors file per stage. Today there is
one stage kind, ``"diffusion"`` (a network, its process and prediction type); the list of
stages is where an autoencoder, a cascade's second model or an adapter will go. A training
checkpoint (``step_*.json`` + ``.safetensors``) converts to a card through
:meth:`ModelCard.from_checkpoint_meta`, which is how existing run folders keep loading.

Reading is strict: an unknown key, a missing key or a value of the wrong type is refused with
the key path named (``stages[0].sigma_data``), and :meth:`ModelCard.load` adds the file.
"""

from __future__ import annotations

import json
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .. import __version__

#: version of the card format written by this code; older formats are converted on reading
CARD_FORMAT = 1
#: file name of the card inside a pipeline folder
CARD_FILE = "model_card.json"

Conditioning = Literal["none", "class", "text"]


@dataclass
class StageCard:
    """One stage of a pipeline; for ``kind="diffusion"`` a denoiser and how to sample it."""

    name: str = field(metadata={"help": "stage name, unique in the card (e.g. 'diffusion')"})
    network: str = field(metadata={"help": "registered network name (networks.NETWORKS)"})
    network_config: dict[str, Any] = field(
        metadata={"help": "the network's own config, as build_network takes it"})
    process: dict[str, Any] = field(metadata={"help": "Process.to_config() of the process"})
    prediction: Literal["eps", "x0", "v", "edm", "score"] = field(
        metadata={"help": "what the network predicts (parameterization.Denoiser)"})
    sample_shape: list[int] = field(
        metadata={"help": "shape of one sample: [C, H, W] for images, [D] for points"})
    weights: str = field(metadata={"help": "safetensors file of this stage, relative to the "
                                           "card's folder"})
    kind: Literal["diffusion"] = field(default="diffusion", metadata={"help": "stage kind"})
    weights_prefix: str = field(default="", metadata={
        "help": "prefix of this stage's tensors in the weights file ('' = the whole file; "
                "'ema' or 'model' inside a training checkpoint)"})
    learned_variance: bool = field(default=False, metadata={
        "help": "the network also outputs the reverse variance (Nichol & Dhariwal 2021)"})
    sigma_data: float = field(default=0.5, metadata={"help": "data std of the edm "
                                                              "preconditioning"})
    data_range: list[float] | None = field(default=None, metadata={
        "help": "[lo, hi] of the data (x0_hat is clipped to it); null for 2-D points"})
    conditioning: Conditioning = field(default="none", metadata={
        "help": "what the network is conditioned on: nothing, class labels or prompts"})
    class_names: list[str] = field(default_factory=list, metadata={
        "help": "class names (index = label; the null label is their number)"})
    text_encoder: str | None = field(default=None, metadata={
        "help": "text encoder of a text model ('minilm' or a local folder)"})
    captions: list[str] = field(default_factory=list, metadata={
        "help": "training captions of a text model (for reference)"})
    dataset: str | None = field(default=None, metadata={
        "help": "data set the stage was trained on (default data of 'difflab nll')"})

    def check(self) -> None:
        """Raise ValueError on values that type checks cannot catch."""
        if self.conditioning == "class" and not self.class_names:
            raise ValueError(f"stage {self.name!r}: conditioning 'class' needs class_names")
        if self.conditioning == "text" and not self.text_encoder:
            raise ValueError(f"stage {self.name!r}: conditioning 'text' needs text_encoder")
        if self.conditioning != "class" and self.class_names:
            raise ValueError(f"stage {self.name!r}: class_names given but conditioning is "
                             f"{self.conditioning!r}")
        if self.data_range is not None and len(self.data_range) != 2:
            raise ValueError(f"stage {self.name!r}: data_range must be [lo, hi]")
        if not self.sample_shape or min(self.sample_shape) < 1:
            raise ValueError(f"stage {self.name!r}: bad sample_shape {self.sample_shape}")


@dataclass
class ModelCard:
    """What a saved model is: its stages, which weights (EMA or raw) and where it came from."""

    stages: list[StageCard] = field(metadata={"help": "the stages, in the order they run"})
    format: int = field(default=CARD_FORMAT, metadata={"help": "card format version"})
    difflab_version: str = field(default=__version__, metadata={
        "help": "difflab version that wrote the weights"})
    ema: bool = field(default=True, metadata={"help": "the weights are the EMA weights"})
    step: int | None = field(default=None, metadata={"help": "training step of the weights"})
    training: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the training config, for reference (not used to load)"})

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Strict inverse of :meth:`to_dict` (errors name the key path)."""
        card = _from_dict(cls, data, "")
        if card.format != CARD_FORMAT:
            raise ValueError(f"model card format {card.format} is not supported (this difflab "
                             f"reads format {CARD_FORMAT})")
        if not card.stages:
            raise ValueError("model card has no stages")
        names = [s.name for s in card.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for s in card.stages:
            s.check()
        return card

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a card file; any problem is a ValueError naming the file."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: {e}") from None

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any], weights: str = "",
                             ema: bool = True) -> ModelCard:
        """The card of a training checkpoint's metadata (``step_*.json`` as written by the
        trainer); ``weights`` is the checkpoint's safetensors file name, whose ``ema.*`` (or,
        with ``ema=False``, ``model.*``) tensors are the network's."""
        net = meta["network"]
        if net["name"] == "classifier":
            raise ValueError("this is a noisy classifier checkpoint, not a diffusion model "
                             "(use it as classifier=... / --classifier)")
        return cls(stages=[StageCard(
            name="diffusion", network=net["name"], network_config=dict(net["config"]),
            process=dict(meta["process"]), prediction=meta["prediction"],
            sample_shape=sample_shape_of(net["name"], net["config"]), weights=weights,
            weights_prefix="ema" if ema else "model",
            learned_variance=bool(meta.get("learned_variance", False)),
            sigma_data=float(meta.get("sigma_data", 0.5)),
            data_range=None if meta.get("data_range") is None else list(meta["data_range"]),
            conditioning=conditioning_of(meta),
            class_names=list(meta.get("class_names") or []),
            text_encoder=meta.get("text_encoder") or None,
            captions=list(meta.get("captions") or []),
            dataset=(meta.get("config") or {}).get("dataset"))],
            difflab_version=meta.get("difflab_version", __version__), ema=ema,
            step=meta.get("step"), training=dict(meta.get("config") or {}))


def sample_shape_of(network: str, config: dict[str, Any]) -> list[int]:
    """The shape of one sample of a registered denoiser network, from its config."""
    if network == "mlp":
        return [int(config["dim"])]
    if network == "unet":
        return [int(config["in_channels"]), int(config["image_size"]),
                int(config["image_size"])]
    raise ValueError(f"no sample shape known for network {network!r}")


def conditioning_of(meta: dict[str, Any]) -> Conditioning:
    """``"text"`` for a model with a text encoder, ``"class"`` with class names, else none."""
    if meta.get("text_encoder"):
        return "text"
    return "class" if meta.get("class_names") else "none"


# -- strict decoding -------------------------------------------------------------------------
def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a JSON object, checking keys and value types."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'card'}: expected an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key {_join(where, unknown[0])!r} in the model card; "
                         f"valid keys{' of ' + where if where else ''}: {sorted(names)}")
    missing = [f.name for f in fields(cls) if f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"missing key {_join(where, missing[0])!r} in the model card")
    return cls(**{k: _typed(v, hints[k], _join(where, k)) for k, v in data.items()})


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _typed(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (and converted: int -> float, objects ->
    dataclasses)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, key)
    if origin is list:
        _expect(isinstance(value, list), value, "a list", key)
        return [_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _expect(isinstance(value, dict), value, "an object", key)
        return dict(value)
    if is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is float:
        _expect(isinstance(value, int | float) and not isinstance(value, bool), value,
                "a number", key)
        return float(value)
    _expect(isinstance(value, tp) and (tp is bool or not isinstance(value, bool)), value,
            tp.__name__, key)
    return value


def _expect(ok: bool, value: Any, what: str, key: str) -> None:
    if not ok:
        raise ValueError(f"{key}: expected {what}, got {value!r} ({type(value).__name__})")
