"""The model card: one typed JSON file that says what each stage of a saved model is.

A pipeline folder holds ``model_card.json`` and one safetensors file per stage. Stage kinds:
``"diffusion"`` (a network, its process and prediction type; exactly one per card) and
``"autoencoder"`` (at most one: the diffusion stage then works in its latent space, Rombach et
al. 2022; the pipeline encodes images before editing and decodes samples after sampling), and
adapter stages (:data:`ADAPTER_KINDS`: LoRA weights, a ControlNet, learned token embeddings)
that modify the diffusion stage, any number of them, each with a ``scale``. A card whose
``base`` names another model holds adapter stages only: an adapter saved alone, applied to its
base when loaded (:func:`~difflab.pipeline.loading.read_source`). A training
checkpoint (``step_*.json`` + ``.safetensors``) converts to a card through
:meth:`ModelCard.from_checkpoint_meta`, which is how existing run folders keep loading.

Reading is strict (``difflab.config.from_dict``): an unknown key, a missing key or a value of
the wrong type is refused with the file and the key path named (``stages[0].sigma_data``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import __version__
from ..config import from_dict, option, to_dict
from ..io import read_json
from ..parameterization import PredictionType

#: version of the card format written by this code
CARD_FORMAT = 1
#: file name of the card inside a pipeline folder
CARD_FILE = "model_card.json"

Conditioning = Literal["none", "class", "text"]
StageKind = Literal["diffusion", "autoencoder", "lora", "controlnet", "embeddings"]
#: stage kinds that modify the diffusion stage (``pipeline.adapters.ADAPTERS`` applies them)
ADAPTER_KINDS: tuple[str, ...] = ("lora", "controlnet", "embeddings")


@dataclass
class StageCard:
    """One stage of a pipeline: for ``kind="diffusion"`` a denoiser and how to sample it; for
    ``kind="autoencoder"`` an image autoencoder (``sample_shape`` and ``data_range`` are the
    images'; ``scale_factor``/``shift_factor`` map its latents to the diffusion stage's)."""

    name: str = option(help="stage name, unique in the card (e.g. 'diffusion')")
    network: str = option(help="registered network name (networks.NETWORKS)")
    network_config: dict[str, Any] = option(
        help="the network's own config, as build_network takes it")
    sample_shape: list[int] = option(
        help="shape of one sample: [C, H, W] for images, [D] for points (a latent diffusion "
             "stage: the latents')")
    weights: str = option(help="safetensors file of this stage, relative to the card's folder")
    kind: StageKind = option("diffusion", "stage kind")
    process: dict[str, Any] = option(
        help="Process.to_config() of the process (diffusion stages)", factory=dict)
    prediction: PredictionType | None = option(
        None, "what the network predicts (parameterization.Denoiser; diffusion stages)")
    scale_factor: float = option(
        1.0, "autoencoder: the diffusion stage's latent is (z - shift_factor) * scale_factor "
             "(1 / the latents' std on the training data, as Stable Diffusion's 0.18215)")
    shift_factor: float = option(0.0, "autoencoder: see scale_factor")
    scale: float = option(
        1.0, "adapter stages: strength (LoRA's scale on B A, a ControlNet's conditioning "
             "scale); 0 leaves the diffusion stage as it is")
    weights_prefix: str = option(
        "", "prefix of this stage's tensors in the weights file ('' = the whole file; 'ema' or "
            "'model' inside a training checkpoint)")
    learned_variance: bool = option(
        False, "the network also outputs the reverse variance (Nichol & Dhariwal 2021)")
    sigma_data: float = option(0.5, "data std of the edm preconditioning")
    base_prediction: Literal["eps", "x0", "v", "edm", "score", "flow"] = option(
        "edm", "consistency models: what the network's raw output is read as underneath the "
               "boundary parameterisation (parameterization.Denoiser)")
    sigma_min: float | None = option(
        None, "consistency models: the boundary noise level s_min = sigma / alpha, where "
              "f(x, t) = x (Song et al. 2023)")
    sigma_max: float | None = option(
        None, "consistency models: the top noise level trained; inputs noisier than it are "
              "evaluated there (parameterization.Denoiser)")
    data_range: list[float] | None = option(
        None, "[lo, hi] of the data (x0_hat is clipped to it); null for 2-D points")
    conditioning: Conditioning = option(
        "none", "what the network is conditioned on: nothing, class labels or prompts")
    class_names: list[str] = option(
        help="class names (index = label; the null label is their number)", factory=list)
    text_encoder: str | None = option(
        None, "text encoder of a text model ('minilm' or a local folder)")
    captions: list[str] = option(help="training captions of a text model (for reference)",
                                 factory=list)
    dataset: str | None = option(
        None, "data set the stage was trained on (default data of 'difflab nll')")
    sampler: str | None = option(
        None, "the stage's own sampler (a distilled student's), used when none is asked for; "
              "None: ddim")
    sampler_steps: int | None = option(
        None, "the steps of ``sampler`` used when none are asked for; None: 50")
    sampler_options: dict[str, Any] = option(
        help="options of ``sampler`` used with it when no sampler is asked for", factory=dict)
    diffusers_timesteps: dict[str, Any] = option(
        help="a diffusers DDPM/DDIM/PNDM scheduler's time grid (spacing, steps_offset; "
             "pipeline.diffusers_in.diffusers_time_grid): the default grid when neither a "
             "grid nor a spacing is asked for; {}: none",
        factory=dict)
    guidance_input: bool = option(
        False, "the network takes the guidance scale w as an input (a guidance-distilled "
               "student, Meng et al. 2023): guidance=w is one network call with w instead of "
               "classifier-free guidance's two; no guidance given means w = 1")
    guidance_range: list[float] | None = option(
        None, "[w_min, w_max]: the guidance scales a guidance_input network was trained on "
              "(for reference; other scales extrapolate)")

    def __post_init__(self) -> None:
        """Checks that types cannot express (``from_dict`` reports them with the file)."""
        if self.kind == "autoencoder":
            self._check_autoencoder()
        elif self.kind in ADAPTER_KINDS:
            self._check_adapter()
        elif not self.process or self.prediction is None:
            raise ValueError(f"stage {self.name!r}: a diffusion stage needs process and "
                             "prediction")
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
        if self.prediction == "consistency" and (self.sigma_min is None
                                                 or not self.sigma_min >= 0):
            raise ValueError(f"stage {self.name!r}: prediction 'consistency' needs "
                             "sigma_min >= 0")
        if self.guidance_input and self.conditioning == "none":
            raise ValueError(f"stage {self.name!r}: guidance_input needs a class- or "
                             "text-conditional stage")
        if self.guidance_range is not None and (len(self.guidance_range) != 2
                                                or self.guidance_range[0] > self.guidance_range[1]):
            raise ValueError(f"stage {self.name!r}: guidance_range must be [w_min, w_max]")
        if self.sampler_steps is not None and self.sampler_steps < 1:
            raise ValueError(f"stage {self.name!r}: sampler_steps must be at least 1")

    def _check_adapter(self) -> None:
        if self.process or self.prediction is not None:
            raise ValueError(f"{self.kind} stage {self.name!r} takes no process or prediction")
        if not abs(self.scale) < float("inf"):
            raise ValueError(f"{self.kind} stage {self.name!r}: scale must be a finite "
                             f"number, got {self.scale}")

    def _check_autoencoder(self) -> None:
        if self.process or self.prediction is not None:
            raise ValueError(f"autoencoder stage {self.name!r} takes no process or prediction")
        if len(self.sample_shape) != 3:
            raise ValueError(f"autoencoder stage {self.name!r}: sample_shape must be the "
                             f"images' [C, H, W], got {self.sample_shape}")
        if not (self.scale_factor > 0 and abs(self.scale_factor) < float("inf")):
            raise ValueError(f"autoencoder stage {self.name!r}: scale_factor must be a "
                             f"positive number, got {self.scale_factor}")


@dataclass
class ModelCard:
    """What a saved model is: its stages, which weights (EMA or raw) and where it came from."""

    stages: list[StageCard] = option(help="the stages, in the order they run")
    format: int = option(CARD_FORMAT, "card format version")
    difflab_version: str = option(__version__, "difflab version that wrote the weights")
    ema: bool = option(True, "the weights are the EMA weights")
    step: int | None = option(None, "training step of the weights")
    training: dict[str, Any] = option(
        help="the training config, for reference (not used to load)", factory=dict)
    base: str | None = option(
        None, "the model this card's adapter stages apply to (a pipeline or run folder; "
              "relative paths are from this card's folder); None: the card is complete")

    def __post_init__(self) -> None:
        if self.format != CARD_FORMAT:
            raise ValueError(f"model card format {self.format} is not supported (this "
                             f"difflab reads format {CARD_FORMAT})")
        if not self.stages:
            raise ValueError("model card has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        kinds = sorted(s.kind for s in self.stages if s.kind not in ADAPTER_KINDS)
        if self.base is not None:
            if kinds:
                raise ValueError(f"a card with a base model holds adapter stages only "
                                 f"({', '.join(ADAPTER_KINDS)}); got {kinds}")
        elif kinds not in (["diffusion"], ["autoencoder", "diffusion"]):
            raise ValueError("a model card holds one diffusion stage, at most one autoencoder "
                             f"stage and adapter stages; got {[s.kind for s in self.stages]}")

    def stage_of(self, kind: StageKind) -> StageCard | None:
        """The (first) stage of ``kind`` (None if the card has none)."""
        return next((s for s in self.stages if s.kind == kind), None)

    @property
    def adapters(self) -> list[StageCard]:
        """The adapter stages, in the order they are applied."""
        return [s for s in self.stages if s.kind in ADAPTER_KINDS]

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model card") -> ModelCard:
        """Strict inverse of :meth:`to_dict`; errors name ``where`` and the key path."""
        return from_dict(cls, data, where)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a card file; any problem is a ValueError naming the file."""
        path = Path(path)
        return cls.from_dict(read_json(path), str(path))

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any], weights: str = "",
                             ema: bool = True) -> ModelCard:
        """The card of a training checkpoint's metadata (``step_*.json`` as written by the
        trainer); ``weights`` is the checkpoint's safetensors file name, whose ``ema.*`` (or,
        with ``ema=False``, ``model.*``) tensors are the network's.

        A fine-tuning run's metadata has ``adapters``: ``{"base": path or None, "stages":
        [adapter stage dicts]}``, each stage's ``weights_prefix`` relative to the trained
        module (``ema.`` or ``model.`` is put in front). With a ``base`` the checkpoint holds
        the adapters only; without, it also holds the whole (fully fine-tuned) network."""
        adapters = meta.get("adapters") or {}
        prefix = "ema" if ema else "model"
        stages = [from_dict(StageCard, {
            **st, "weights": weights,
            "weights_prefix": ".".join(filter(None, (prefix, st.get("weights_prefix") or "")))},
            f"checkpoint adapter stage {i}") for i, st in enumerate(adapters.get("stages") or [])]
        if adapters.get("base") is not None:
            return cls(stages=stages, base=str(adapters["base"]), ema=ema,
                       step=meta.get("step"), training=dict(meta.get("config") or {}),
                       difflab_version=meta.get("difflab_version", __version__))
        card = cls._diffusion_from_meta(meta, weights, ema)
        card.stages.extend(stages)
        if meta.get("autoencoder_stage"):  # a latent diffusion model (recipes.latent)
            ae = from_dict(StageCard, meta["autoencoder_stage"], "checkpoint autoencoder stage")
            card.stages.append(ae)
        card.__post_init__()
        return card

    @classmethod
    def _diffusion_from_meta(cls, meta: dict[str, Any], weights: str, ema: bool) -> ModelCard:
        prefix = "ema" if ema else "model"
        if "autoencoder" in meta and "network" not in meta and "stage" not in meta:
            raise ValueError("this is an autoencoder checkpoint, not a diffusion model (train "
                             "a latent diffusion model on it with --autoencoder)")
        if "stage" in meta:  # a distilled student: its whole card (difflab.recipes.distill)
            # a stage's own prefix points inside the trained module (e.g. "student")
            inner = meta["stage"].get("weights_prefix") or ""
            stage = from_dict(StageCard, {**meta["stage"], "weights": weights,
                                          "weights_prefix": ".".join(filter(None, (prefix,
                                                                                   inner)))},
                              "checkpoint stage")
            return cls(stages=[stage], difflab_version=meta.get("difflab_version", __version__),
                       ema=ema, step=meta.get("step"), training=dict(meta.get("config") or {}))
        net = meta["network"]
        if net["name"] == "classifier":
            raise ValueError("this is a noisy classifier checkpoint, not a diffusion model "
                             "(use it as classifier=... / --classifier)")
        return cls(stages=[StageCard(
            name="diffusion", network=net["name"], network_config=dict(net["config"]),
            process=dict(meta["process"]), prediction=meta["prediction"],
            sample_shape=list(meta.get("sample_shape") or sample_shape_of(net["name"],
                                                                          net["config"])),
            weights=weights,
            weights_prefix=prefix,
            learned_variance=bool(meta.get("learned_variance", False)),
            sigma_data=float(meta.get("sigma_data", 0.5)),
            **_consistency_fields(meta),
            data_range=None if meta.get("data_range") is None else list(meta["data_range"]),
            conditioning=conditioning_of(meta),
            class_names=list(meta.get("class_names") or []),
            text_encoder=meta.get("text_encoder") or None,
            captions=list(meta.get("captions") or []),
            dataset=_training_dataset(meta.get("config") or {}))],
            difflab_version=meta.get("difflab_version", __version__), ema=ema,
            step=meta.get("step"), training=dict(meta.get("config") or {}))


def _consistency_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """A trained consistency model's stage fields (``difflab train --objective
    consistency-training`` writes them into its checkpoint metadata): boundary, base type and
    its own sampler."""
    keys = ("base_prediction", "sigma_min", "sigma_max", "sampler", "sampler_steps",
            "sampler_options")
    return {k: meta[k] for k in keys if meta.get(k) is not None}


def _training_dataset(config: dict[str, Any]) -> str | None:
    """The data set of a run config: nested (``data.dataset``) or the older flat one."""
    data = config.get("data", config)
    return data.get("dataset") if isinstance(data, dict) else None


def sample_shape_of(network: str, config: dict[str, Any]) -> list[int]:
    """The shape of one sample of a U-Net, DiT or MLP denoiser, from its config (checkpoints
    written before the trainer recorded ``sample_shape`` in their metadata)."""
    if network == "mlp":
        return [int(config["dim"])]
    if network in ("unet", "dit"):
        return [int(config["in_channels"]), int(config["image_size"]),
                int(config["image_size"])]
    raise ValueError(f"no sample shape known for network {network!r}")


def conditioning_of(meta: dict[str, Any]) -> Conditioning:
    """``"text"`` for a model with a text encoder, ``"class"`` with class names, else none."""
    if meta.get("text_encoder"):
        return "text"
    return "class" if meta.get("class_names") else "none"
