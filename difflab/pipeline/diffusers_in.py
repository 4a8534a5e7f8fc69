"""diffusers model folders as difflab pipelines: the folder, its scheduler config -> a process,
and a model card built on the fly (nothing is converted or written).

Two layouts are read (``save_pretrained`` of diffusers' pipelines):

- **pixel** (``DDPMPipeline`` / ``DDIMPipeline``): ``model_index.json``, ``unet/``
  (``config.json`` + ``diffusion_pytorch_model.safetensors`` of a ``UNet2DModel``) and
  ``scheduler/scheduler_config.json``; or a lone ``UNet2DModel`` folder with its scheduler
  config beside it (``scheduler_config.json`` in it, or ``../scheduler/``).
- **Stable Diffusion** (``StableDiffusionPipeline``): ``unet/`` (``UNet2DConditionModel``),
  ``vae/`` (``AutoencoderKL``), ``text_encoder/`` (``CLIPTextModel``), ``tokenizer/``
  (``CLIPTokenizer``) and ``scheduler/``: a latent, text-conditional pipeline whose prompts go
  through the CLIP encoder of the folder (:mod:`difflab.text.clip`, offline).

The networks run as diffusers' own modules (:mod:`difflab.networks.diffusers_unet`). Only
safetensors are read; pickled ``.bin`` weights are refused.

The scheduler config maps onto a :class:`~difflab.process.DiscreteProcess` exactly, or is
refused with the key named. diffusers' timestep k indexes ``alphas_cumprod[k]``, which is
difflab's alpha_bar at step t = k + 1 (t = 0 is the data), and the network is called with
k (:class:`~difflab.networks.diffusers_unet.DiffusersUNet`).

=========================  ===============================================================
scheduler key              difflab
=========================  ===============================================================
``beta_schedule``          ``linear`` / ``scaled_linear`` (beta_1, beta_T = beta_start,
                           beta_end), ``squaredcos_cap_v2`` -> ``cosine``, ``sigmoid``
``trained_betas``          the one of those schedules it equals (else refused)
``num_train_timesteps``    T
``prediction_type``        ``epsilon`` -> eps, ``v_prediction`` -> v, ``sample`` -> x0
``rescale_betas_zero_snr`` ``zero_terminal_snr`` (Lin et al. 2024, Algorithm 1)
``timestep_spacing``,      the default time grid (DDPM, DDIM and PNDM schedulers:
``steps_offset``           :func:`diffusers_time_grid`); other schedulers use difflab's
                           default grid
``set_alpha_to_one``       read, not mapped: difflab's samplers end at x0_hat, as diffusers
                           does with it true; false stops at alphas_cumprod[0]
``variance_type``          DDPM: ``fixed_small`` -> ddpm variance beta_tilde,
                           ``fixed_large`` -> beta, ``learned_range`` -> learned variance
``clip_sample``            DDPM: x0_hat clipped to [-1, 1], as difflab's clip does;
                           DDIM: refused (diffusers clips x0_hat but keeps eps_hat)
``thresholding``           refused when true
=========================  ===============================================================
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import LoadError, read_json
from ..networks.diffusers_vae import weights_file
from ..process import BETA_SCHEDULES
from .card import CARD_FILE, ModelCard, StageCard

__all__ = ["diffusers_card", "diffusers_time_grid", "is_diffusers_folder",
           "process_from_scheduler", "scheduler_sampler"]

INDEX = "model_index.json"
#: written beside model_index.json by ``difflab export`` for what diffusers' configs cannot say
#: (a class-conditional U-Net's class names; its null label is their number)
DIFFLAB_FILE = "difflab.json"
CONFIG = "config.json"
SCHEDULER = "scheduler_config.json"
UNETS = ("UNet2DModel", "UNet2DConditionModel")

#: diffusers beta_schedule -> difflab schedule (with beta_start/end as beta_1/beta_T)
BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear",
              "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
#: scheduler class -> difflab sampler used when none is asked for
SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "plms",
            "EulerDiscreteScheduler": "euler", "HeunDiscreteScheduler": "heun",
            "LMSDiscreteScheduler": "lms", "DPMSolverMultistepScheduler": "dpmpp_2m",
            "UniPCMultistepScheduler": "unipc_bh2"}
#: schedulers whose own time grid is the default grid (:func:`diffusers_time_grid`)
GRID_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
#: keys that define the process (mapped exactly, or refused)
PROCESS_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                "trained_betas", "prediction_type", "rescale_betas_zero_snr"}
#: keys read as the DDPM/DDIM/PNDM default grid and sampler
GRID_KEYS = {"timestep_spacing", "steps_offset", "set_alpha_to_one", "variance_type",
             "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
             "sample_max_value", "skip_prk_steps"}
#: keys of the other schedulers' own solvers and grids (difflab's sampler replaces them)
SOLVER_KEYS = {"solver_order", "algorithm_type", "solver_type", "lower_order_final",
               "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas",
               "use_beta_sigmas", "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped",
               "variance_type", "interpolation_type", "timestep_spacing", "steps_offset",
               "predict_x0", "disable_corrector", "solver_p", "sigma_min", "sigma_max",
               "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
               "clip_sample", "clip_sample_range", "set_alpha_to_one", "timestep_type"}
#: flow-matching options of the multistep schedulers: inert at these values, else refused
FLOW_KEYS = {"use_flow_sigmas": False, "use_dynamic_shifting": False, "shift_terminal": None,
             "flow_shift": None, "time_shift_type": None}
META_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def _refuse(source: Any, key: str, value: Any, why: str) -> LoadError:
    return LoadError(f"{source}: {key}={value!r} cannot be loaded ({why})")


# -- the folder ---------------------------------------------------------------------------------
def _class_of(folder: Path) -> str | None:
    try:
        config = read_json(folder / CONFIG)
    except (OSError, ValueError):
        return None
    return config.get("_class_name") if isinstance(config, dict) else None


def is_diffusers_folder(path: str | Path) -> bool:
    """``path`` is a diffusers pipeline folder (``model_index.json`` or ``unet/``) or a lone
    diffusers U-Net folder, not a difflab pipeline or run folder."""
    p = Path(path)
    if not p.is_dir() or (p / CARD_FILE).is_file():
        return False
    if (p / INDEX).is_file() or (p / "unet" / CONFIG).is_file():
        return True
    return (p / CONFIG).is_file() and _class_of(p) in UNETS


def _unet_folder(root: Path) -> Path:
    return root / "unet" if (root / "unet" / CONFIG).is_file() else root


def _scheduler_file(root: Path, unet: Path) -> Path:
    for f in (root / "scheduler" / SCHEDULER, unet / SCHEDULER, unet.parent / "scheduler" /
              SCHEDULER):
        if f.is_file():
            return f
    raise LoadError(f"{root}: no scheduler config (scheduler/{SCHEDULER}, or {SCHEDULER} "
                    "beside the unet's config.json)")


def _json(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# -- scheduler config -> process ------------------------------------------------------------------
def _schedule_of_betas(betas: list[float], T: int, source: Any) -> dict[str, Any]:
    """The difflab schedule (name and arguments) that ``trained_betas`` equal, else refused."""
    given = torch.tensor(betas, dtype=torch.float64)
    if given.numel() != T:
        raise _refuse(source, "trained_betas", f"<{given.numel()} values>",
                      f"num_train_timesteps is {T}")
    b1, bT = float(given[0]), float(given[-1])
    candidates = [("linear", {"beta_1": b1, "beta_T": bT}),
                  ("scaled_linear", {"beta_1": b1, "beta_T": bT}),
                  ("sigmoid", {"beta_1": b1, "beta_T": bT}), ("cosine", {})]
    for name, args in candidates:
        if min(b1, bT) <= 0 and name == "scaled_linear":
            continue
        ours = BETA_SCHEDULES[name](T, **args)
        if torch.allclose(ours, given, rtol=1e-5, atol=1e-9):
            return {"schedule": name, **args}
    raise _refuse(source, "trained_betas", f"<{T} values>", "difflab builds betas from a "
                  "schedule; these are not linear, scaled_linear, sigmoid or cosine")


def process_from_scheduler(config: dict[str, Any], source: Any = SCHEDULER
                           ) -> tuple[dict[str, Any], str]:
    """(``Process.to_config()`` of the discrete process, difflab prediction type) of a
    diffusers scheduler config; a key that cannot map is a LoadError naming it."""
    cls = config.get("_class_name", "DDPMScheduler")
    if cls not in SAMPLERS:
        raise _refuse(source, "_class_name", cls, "difflab reads the discrete-time "
                      f"schedulers {sorted(SAMPLERS)}")
    T = config.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise _refuse(source, "num_train_timesteps", T, "an integer of at least 2")
    if config.get("trained_betas") is not None:
        schedule = _schedule_of_betas(config["trained_betas"], T, source)
    else:
        name = config.get("beta_schedule", "linear")
        if name not in BETA_NAMES:
            raise _refuse(source, "beta_schedule", name, f"difflab maps {sorted(BETA_NAMES)}")
        args = {} if name == "squaredcos_cap_v2" else {
            "beta_1": float(config.get("beta_start", 0.0001)),
            "beta_T": float(config.get("beta_end", 0.02))}
        schedule = {"schedule": BETA_NAMES[name], **args}
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise _refuse(source, "prediction_type", kind, f"difflab maps {sorted(PREDICTIONS)}")
    ztsnr = bool(config.get("rescale_betas_zero_snr", False))
    return {"kind": "discrete", "T": T, "zero_terminal_snr": ztsnr, **schedule}, \
        PREDICTIONS[kind]


def scheduler_sampler(config: dict[str, Any], source: Any = SCHEDULER
                      ) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
    """(default sampler, its options, the default grid's settings for
    :func:`diffusers_time_grid` ({} = difflab's default grid), learned variance) of a
    scheduler config; options that change the sampling update in a way no difflab sampler
    reproduces are refused by name."""
    cls = config.get("_class_name", "DDPMScheduler")
    own = GRID_KEYS if cls in GRID_SCHEDULERS else SOLVER_KEYS | set(FLOW_KEYS)
    unknown = sorted(set(config) - PROCESS_KEYS - META_KEYS - own)
    if unknown:
        raise _refuse(source, unknown[0], config[unknown[0]], f"an option of {cls} that "
                      "difflab does not map")
    for key, inert in FLOW_KEYS.items():  # flow_shift, time_shift_type act through these
        if inert is not None and config.get(key, inert) != inert:
            raise _refuse(source, key, config[key], "flow-matching sigmas are not the "
                          "discrete DDPM process")
    if config.get("thresholding"):
        raise _refuse(source, "thresholding", True, "dynamic thresholding is not a difflab "
                      "denoiser; set it to false")
    if config.get("timestep_type", "discrete") != "discrete":
        raise _refuse(source, "timestep_type", config["timestep_type"], "only discrete "
                      "timesteps map to difflab's discrete process")
    if cls not in GRID_SCHEDULERS:
        return SAMPLERS[cls], {}, {}, False
    options: dict[str, Any] = {}
    learned = False
    if config.get("clip_sample", cls != "PNDMScheduler"):  # PNDM has no clip_sample
        if cls != "DDPMScheduler":
            raise _refuse(source, "clip_sample", True, f"{cls} clips x0_hat but keeps "
                          "eps_hat, which changes the ODE; set it to false (difflab clips "
                          "x0_hat and eps_hat together by default)")
        if float(config.get("clip_sample_range", 1.0)) != 1.0:
            raise _refuse(source, "clip_sample_range", config["clip_sample_range"],
                          "difflab clips x0_hat to the data range [-1, 1]")
    if cls == "DDPMScheduler":
        variance = config.get("variance_type", "fixed_small")
        table = {"fixed_small": "beta_tilde", "fixed_large": "beta", "learned_range": "auto"}
        if variance not in table:
            raise _refuse(source, "variance_type", variance, f"difflab maps {sorted(table)}")
        options["variance"], learned = table[variance], variance == "learned_range"
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise _refuse(source, "timestep_spacing", spacing, "leading, trailing or linspace")
    offset = config.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _refuse(source, "steps_offset", offset, "a non-negative integer")
    grid = {"spacing": spacing, "steps_offset": offset}
    return SAMPLERS[cls], options, grid, learned


def diffusers_timesteps(grid: dict[str, Any], T: int, n: int) -> np.ndarray:
    """The scheduler's ``set_timesteps(n)`` timesteps (decreasing int64, diffusers' indices
    0..T-1), as DDPM/DDIM/PNDM schedulers compute them."""
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must be in [1, {T}], got {n}")
    spacing = grid["spacing"]
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        steps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
        return steps + int(grid.get("steps_offset", 0))
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def diffusers_time_grid(grid: dict[str, Any], T: int, n: int) -> Tensor:
    """The difflab time grid (float64, decreasing) of a diffusers scheduler's ``n`` steps:
    each timestep k is difflab time k + 1, then time 0, where every difflab sampler's last
    step returns x0_hat.

    That end point is diffusers' with ``set_alpha_to_one`` (DDIM, PNDM) and always for DDPM.
    Without it diffusers' last step lands on ``alphas_cumprod[0]`` instead (difflab time 1,
    leaving sqrt(1 - alpha_bar_1) eps_hat in the output); DDIM's step from k goes to
    k - T // n, the next timestep for ``leading`` spacing and whenever n divides T."""
    steps = diffusers_timesteps(grid, T, n)
    if len(np.unique(steps)) != n or steps.min() < 0 or steps.max() > T - 1:
        raise ValueError(f"timestep_spacing {grid['spacing']!r} with steps_offset "
                         f"{grid.get('steps_offset', 0)} gives no {n} distinct timesteps in "
                         f"0..{T - 1}")
    return torch.tensor([*(steps + 1).tolist(), 0], dtype=torch.float64)


# -- networks -------------------------------------------------------------------------------------
def _sample_size(config: dict[str, Any], source: Path) -> tuple[int, int]:
    size = config.get("sample_size")
    if isinstance(size, int):
        return size, size
    if isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return size[0], size[1]
    raise _refuse(source, "sample_size", size, "an integer or [height, width]")


def _check_unet2d(config: dict[str, Any], source: Path, learned: bool,
                  class_names: list[str]) -> None:
    """Refuse UNet2DModel options difflab's denoiser cannot drive; ``class_names`` of a
    class-conditional one come from :data:`DIFFLAB_FILE`."""
    if config.get("time_embedding_type", "positional") != "positional":
        raise _refuse(source, "time_embedding_type", config["time_embedding_type"],
                      "Fourier time features belong to score-SDE (VE) models; difflab reads "
                      "DDPM-type U-Nets")
    if config.get("class_embed_type") is not None:
        raise _refuse(source, "class_embed_type", config["class_embed_type"], "difflab "
                      "reads label embeddings (num_class_embeds) only")
    n = config.get("num_class_embeds")
    if n is not None and len(class_names) + 1 != n:
        raise _refuse(source, "num_class_embeds", n, "a class-conditional UNet2DModel has no "
                      f"null class for difflab's guidance unless {DIFFLAB_FILE} (written by "
                      "difflab export) names its classes")
    cin, cout = config.get("in_channels", 3), config.get("out_channels", 3)
    if cout != cin * (2 if learned else 1):
        raise _refuse(source, "out_channels", cout, f"expected {cin * (2 if learned else 1)}"
                      f" for in_channels={cin}" + (" with a learned variance" if learned
                                                    else ""))


def _check_unet_cond(config: dict[str, Any], source: Path) -> None:
    """Refuse UNet2DConditionModel options beyond text cross-attention (SDXL's extra
    embeddings, class embeddings, guidance-scale inputs, projected encoders)."""
    for key in ("addition_embed_type", "class_embed_type", "num_class_embeds",
                "time_cond_proj_dim", "encoder_hid_dim", "encoder_hid_dim_type"):
        if config.get(key) is not None:
            raise _refuse(source, key, config[key], "difflab conditions a "
                          "UNet2DConditionModel on text embeddings only")
    if config.get("time_embedding_type", "positional") != "positional":
        raise _refuse(source, "time_embedding_type", config["time_embedding_type"],
                      "only positional timestep embeddings")


def _class_names(root: Path) -> list[str]:
    """The class names in ``root``'s :data:`DIFFLAB_FILE` ([] without one)."""
    path = root / DIFFLAB_FILE
    if not path.is_file():
        return []
    names = _json(path).get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _refuse(path, "class_names", names, "a list of strings")
    return names


def _unet_stage(unet: Path, root: Path, scheduler: dict[str, Any], sched_file: Path,
                text: bool) -> StageCard:
    config = _json(unet / CONFIG)
    cls = config.get("_class_name")
    want = "UNet2DConditionModel" if text else "UNet2DModel"
    if cls != want:
        raise _refuse(unet / CONFIG, "_class_name", cls, f"this layout needs a {want}")
    process, prediction = process_from_scheduler(scheduler, sched_file)
    sampler, options, grid, learned = scheduler_sampler(scheduler, sched_file)
    names: list[str] = []
    if text:
        _check_unet_cond(config, unet / CONFIG)
    else:
        names = _class_names(root) if config.get("num_class_embeds") is not None else []
        _check_unet2d(config, unet / CONFIG, learned, names)
    h, w = _sample_size(config, unet / CONFIG)
    net_config = {"model_class": want, "num_train_timesteps": process["T"],
                  "config": {k: v for k, v in config.items() if k not in META_KEYS}}
    return StageCard(
        name="diffusion", network="diffusers_unet", network_config=net_config,
        sample_shape=[int(config.get("in_channels", 4 if text else 3)), h, w],
        weights=str(weights_file(unet).relative_to(root)), process=process,
        prediction=prediction, learned_variance=learned,
        data_range=None if text else [-1.0, 1.0], sampler=sampler, sampler_options=options,
        diffusers_timesteps=grid,
        conditioning="text" if text else ("class" if names else "none"),
        class_names=names,
        text_encoder=str(root.resolve()) if text else None)


def _vae_stage(root: Path, latent_hw: tuple[int, int]) -> StageCard:
    vae = root / "vae"
    config = _json(vae / CONFIG)
    source = vae / CONFIG
    if config.get("_class_name") != "AutoencoderKL":
        raise _refuse(source, "_class_name", config.get("_class_name"), "the vae must be an "
                      "AutoencoderKL")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise _refuse(source, key, "...", "per-channel latent statistics; difflab scales "
                          "latents by one factor")
    scale = config.get("scaling_factor", 0.18215)
    shift = config.get("shift_factor") or 0.0
    if not isinstance(scale, int | float) or not scale > 0 or not math.isfinite(scale):
        raise _refuse(source, "scaling_factor", scale, "a positive number")
    f = 2 ** (len(config.get("block_out_channels", [64])) - 1)
    return StageCard(
        name="autoencoder", kind="autoencoder", network="diffusers_autoencoder",
        network_config={"config": {k: v for k, v in config.items() if k not in META_KEYS}},
        sample_shape=[int(config.get("in_channels", 3)), latent_hw[0] * f, latent_hw[1] * f],
        weights=str(weights_file(vae).relative_to(root)), data_range=[-1.0, 1.0],
        scale_factor=float(scale), shift_factor=float(shift))


#: model_index.json components read (the others must be absent or null)
COMPONENTS = {"unet", "scheduler", "vae", "text_encoder", "tokenizer", "safety_checker",
              "feature_extractor", "image_encoder"}


def _check_index(index: dict[str, Any], source: Path) -> bool:
    """True for the Stable Diffusion layout, False for a pixel one; others are refused."""
    for key, value in index.items():
        if key.startswith("_") or key in COMPONENTS:
            continue
        if isinstance(value, list) and value and value[-1] is not None:
            raise _refuse(source, key, value, "a component difflab does not read (it reads "
                          "DDPM/DDIM UNet2DModel and Stable Diffusion 1/2 folders)")
    image = index.get("image_encoder")
    if isinstance(image, list) and image and image[-1] is not None:
        raise _refuse(source, "image_encoder", image, "difflab conditions on text only")
    text = "text_encoder" in index or "vae" in index
    if text:
        for part, cls in (("vae", "AutoencoderKL"), ("text_encoder", "CLIPTextModel"),
                          ("tokenizer", None)):
            got = index.get(part)
            if not isinstance(got, list) or len(got) != 2 or got[1] is None:
                raise LoadError(f"{source}: the Stable Diffusion layout needs a {part!r} "
                                "component")
            if cls is not None and got[1] != cls:
                raise _refuse(source, part, got, f"difflab reads a {cls}")
    return text


def diffusers_card(path: str | Path) -> tuple[ModelCard, Path]:
    """(model card, folder its weights are relative to) of a diffusers folder
    (:func:`is_diffusers_folder`): a diffusion stage running the diffusers U-Net with the
    process of its scheduler config, plus for the Stable Diffusion layout an autoencoder stage
    (the diffusers ``AutoencoderKL``, its ``scaling_factor`` and ``shift_factor`` kept) and
    text conditioning through the folder's CLIP encoder."""
    root = Path(path)
    index_file = root / INDEX
    index = _json(index_file) if index_file.is_file() else {}
    text = _check_index(index, index_file) if index else False
    if not text and (root / "vae" / CONFIG).is_file() and (root / "unet").is_dir():
        text = True
    if text:
        for part in ("vae", "text_encoder", "tokenizer"):
            if not (root / part).is_dir():
                raise LoadError(f"{root}: the Stable Diffusion layout needs {part}/ on disk")
    unet = _unet_folder(root)
    sched_file = _scheduler_file(root, unet)
    scheduler = _json(sched_file)
    stage = _unet_stage(unet, root, scheduler, sched_file, text)
    stages = [stage]
    if text:
        stages.append(_vae_stage(root, (stage.sample_shape[1], stage.sample_shape[2])))
    training = {"source": "diffusers", "scheduler": scheduler}
    return ModelCard(stages=stages, ema=True, training=training), root
