"""``difflab eval`` (FID / KID / IS / precision-recall of a sample set) and ``difflab nll``
(bits/dim of a trained model by the variational bound or the probability-flow ODE)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import from_uint8
from ..evaluation import (
    METRICS,
    extract,
    format_table,
    load_reference,
    load_sample_set,
    model_bits_per_dim,
    parse_features,
    sample_metrics,
    save_reference,
    vlb_evaluations,
)
from ..evaluation.builtin import BUILTIN_STEPS, dataset_of_builtin_name
from ..evaluation.inception import FID_WEIGHTS_NAME
from ..evaluation.reference import dataset_spec, is_reference_file
from ..evaluation.report import parse_metrics
from ..pipeline import Pipeline, load_extractor
from ..training import pick_device
from ..training.checkpoint import write_json
from .outputs import add_overwrite_option, check_outputs
from .progress import ProgressDenoiser

FEATURES_OPTION_HELP = (
    "feature space of the metrics. 'builtin' (or builtin:DATASET): a small CNN trained on the "
    "train split of the --reference data set (digits, shapes, a labelled image folder) on "
    "first use, on the CPU from fixed seeds, and cached in $DIFFLAB_CACHE_DIR or "
    "~/.cache/difflab/features; nothing is downloaded. classifier:RUN: the noisy classifier "
    "of 'difflab train-classifier' (run folder or checkpoint) at t ~ 0, features = its pooled "
    "last layer. featurenet:PATH: a saved feature network (.json + .safetensors). "
    "inception:PATH: the official FID protocol (Heusel et al. 2017, as pytorch-fid computes "
    "it): InceptionV3 pool3 features, 2048-d, images resized bilinearly to 299 x 299, with "
    f"pytorch-fid's weights {FID_WEIGHTS_NAME} (a port of TensorFlow's "
    "pt_inception-2015-12-05) read from the local file PATH; never downloaded")


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` and ``nll``."""
    p = sub.add_parser("eval", help="FID, KID, IS, precision/recall of a sample set",
                       description="Compare a sample set with a reference in the feature space "
                                   "of an extractor; prints a table, writes JSON with --out.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", required=True,
                   help="folder of images, .npz from 'difflab sample --save-npz', or a data set "
                        "(digits, digits:test, digits:train, folder:PATH)")
    p.add_argument("--reference", default=None,
                   help="the same kinds as --samples, or a statistics .npz from "
                        "--save-reference")
    p.add_argument("--features", default="builtin", help=FEATURES_OPTION_HELP)
    p.add_argument("--feature-steps", type=int, default=BUILTIN_STEPS,
                   help="training steps of the built-in feature network (first use only; "
                        "each value is cached apart)")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of "
                   f"{','.join(METRICS)}")
    p.add_argument("--save-reference", default=None,
                   help="write the --samples features' statistics (.npz) for later use")
    p.add_argument("--resolution", type=int, default=None,
                   help="resolution for data-set names (default: that of --samples)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    add_overwrite_option(p)
    p.set_defaults(func=run_eval)
    add_nll_parser(sub)


def _reference_features(args: argparse.Namespace, extractor: Any, shape: tuple[int, ...]
                        ) -> tuple[np.ndarray | None, Any, str]:
    """(features or None, FeatureStats or None, description) of --reference."""
    if is_reference_file(args.reference):
        ref = load_reference(args.reference)
        if ref.extractor != extractor.name:
            print(f"warning: {args.reference} was computed with {ref.extractor!r}, not "
                  f"{extractor.name!r}")
        return ref.features, ref.stats, f"{args.reference} (statistics)"
    ref_set = load_sample_set(args.reference, args.resolution or shape[1], shape[3])
    return extract(extractor, ref_set.images, args.batch_size).features, None, ref_set.source


def _builtin_dataset(args: argparse.Namespace) -> str | None:
    """The data set the built-in features are trained on: that of --reference (a data set, or
    statistics saved with built-in features), else --samples when it names a data set."""
    if args.reference is not None:
        if is_reference_file(args.reference):
            return dataset_of_builtin_name(load_reference(args.reference).extractor)
        return dataset_spec(args.reference)
    return dataset_spec(args.samples, named_only=True)


def run_eval(args: argparse.Namespace) -> int:
    metrics = parse_metrics(args.metrics)
    parse_features(args.features)  # a bad value fails before any loading
    if args.feature_steps < 1:
        raise ValueError(f"--feature-steps must be >= 1, got {args.feature_steps}")
    check_outputs(args, out=args.out, save_reference=args.save_reference)
    samples = load_sample_set(args.samples, args.resolution)
    _, height, _, channels = samples.images.shape
    extractor = load_extractor(args.features, pick_device(args.device),
                               dataset=_builtin_dataset(args), resolution=height,
                               channels=channels, builtin_steps=args.feature_steps)
    fake = extract(extractor, samples.images, args.batch_size)
    if args.save_reference:
        path = save_reference(args.save_reference, fake.features, extractor.name)
        print(f"wrote reference statistics of {len(fake.features)} images ({extractor.name}) "
              f"to {path}")
        if args.reference is None:
            return 0
    if args.reference is None and metrics != ["is"]:
        raise ValueError("--reference is needed for fid, kid and pr (or use --metrics is)")
    real, real_stats, ref_name = (None, None, None) if args.reference is None else \
        _reference_features(args, extractor, samples.images.shape)
    report = {"samples": samples.source, "reference": ref_name, "extractor": extractor.name,
              **sample_metrics(fake.features, real, metrics=metrics, fake_probs=fake.probs,
                               real_stats=real_stats, kid_subsets=args.kid_subsets,
                               kid_subset_size=args.kid_subset_size, k=args.k,
                               is_splits=args.is_splits, seed=args.seed)}
    cols = [c for c in ("n_samples", "fid", "kid_mean", "kid_std", "is_mean", "is_std",
                        "precision", "recall") if c in report]
    print(f"features: {extractor.name}\n" + format_table([report], cols))
    if args.out:
        write_json(Path(args.out), report)
        print(f"wrote {args.out}")
    return 0


def add_nll_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nll", help="bits/dim of a trained model (VLB or probability-flow ODE)",
                       description="Negative log-likelihood in bits per dimension of held-out "
                                   "data under a checkpoint: the variational bound (discrete "
                                   "processes) or the exact probability-flow ODE likelihood.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--method", default="vlb", choices=["vlb", "ode"])
    p.add_argument("--data", default=None, help="images to score (default: the checkpoint's "
                   "data set, test split, e.g. digits:test); any --samples kind of eval")
    p.add_argument("--n", type=int, default=None, help="score only the first N images")
    p.add_argument("--variance", default="beta_tilde", choices=["beta", "beta_tilde"],
                   help="VLB: fixed reverse variance")
    p.add_argument("--steps", type=int, default=None,
                   help="VLB: evaluate a stratified sample of this many terms (default all)")
    p.add_argument("--trace", default="hutchinson", choices=["hutchinson", "exact"])
    p.add_argument("--probe", default="rademacher", choices=["rademacher", "gaussian"])
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--unconditional", action="store_true",
                   help="score with the null label instead of the data's labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    add_overwrite_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_nll)


def run_nll(args: argparse.Namespace) -> int:
    check_outputs(args, out=args.out)
    device = pick_device(args.device)
    pipe = Pipeline.from_pretrained(args.checkpoint, device=device,
                                    ema=False if args.no_ema else None)
    # the ODE needs gradients through x0_hat: no clipping there
    denoiser = pipe.denoiser(clip=args.method == "vlb")
    stage = pipe.stage
    if pipe.is_latent:
        raise ValueError("difflab nll scores images by the model's own likelihood; a latent "
                         "model's is of its latents, not of the images (the autoencoder has "
                         "none): no bits/dim")
    if len(pipe.sample_shape) != 3 or stage.data_range is None:
        raise ValueError("difflab nll scores 8-bit images; this checkpoint models 2-D points")
    if args.data is None and stage.dataset is None:
        raise ValueError("the model card names no training data set: give --data")
    spec = args.data or f"{stage.dataset}:test"
    channels, _, size = pipe.sample_shape
    data = load_sample_set(spec, size, channels)
    images = from_uint8(torch.as_tensor(data.images[:args.n])).permute(0, 3, 1, 2)
    labels = None
    if pipe.class_names and data.labels is not None and not args.unconditional:
        labels = torch.as_tensor(data.labels[:args.n]).long()
    if args.method == "vlb":
        options: dict[str, Any] = {"variance": args.variance, "steps": args.steps}
    else:
        options = {"trace": args.trace, "probe": args.probe, "rtol": args.rtol,
                   "atol": args.atol}
    # the bar advances per network evaluation: per term of the bound (and batch) for the
    # VLB, per ODE function evaluation (unknown count) for the ODE; it opens at the first
    total = (vlb_evaluations(int(denoiser.process.T), len(images), args.batch_size,
                             args.steps) if args.method == "vlb" else None)
    counted = ProgressDenoiser(denoiser, total=total, desc=f"nll ({args.method})",
                               unit="term" if args.method == "vlb" else "NFE",
                               disable=args.no_progress)
    try:
        bits = model_bits_per_dim(counted, images, labels, args.method, args.batch_size,
                                  args.seed, device, **options)
    finally:
        counted.close()
    result = {"checkpoint": str(args.checkpoint), "data": spec, "method": args.method,
              "conditional": labels is not None, **{k: v for k, v in options.items()},
              **bits}
    print(format_table([result], ["data", "method", "n", "bits_per_dim", "stderr"]))
    if args.out:
        write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0
