"""Sample quality and likelihood of the default digits model, with difflab's own metrics.

Trains the README's default digits model (``difflab train`` defaults) unless ``--checkpoint``
is given, trains the feature classifier on the digits' train split, then reports FID / KID /
precision / recall in the classifier's feature space of ``--n`` class-balanced samples against
the held-out test digits, for DDIM (eta = 0) at 10, 20, 50, 100 steps and DDPM (beta_tilde) at
1000 steps, next to the real-data baseline (``--n`` train digits against the test digits), and
the model's bits/dim on the test digits (VLB with the discretized decoder; dequantized ODE
likelihood with the Hutchinson estimator on a subset). Prints a markdown table, writes JSON.

    python benchmarks/quality.py                       # train (about 4-6 min on 2 CPU cores)
    python benchmarks/quality.py --checkpoint runs/digits
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from difflab.data import from_uint8, load_digits, to_uint8
from difflab.evaluation import (
    ModuleExtractor,
    extract,
    format_table,
    model_bits_per_dim,
    sample_metrics,
    save_feature_net,
    train_feature_net,
)
from difflab.evaluation.featurenet import feature_net_accuracy as accuracy
from difflab.pipeline import Pipeline
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.samplers import get_sampler
from difflab.samplers.generate import generate
from difflab.training import pick_device

CONFIGS = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("ddpm", 1000)]
COLUMNS = ["set", "steps", "fid", "kid_mean", "kid_std", "precision", "recall", "seconds"]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the 8-bit grid, as saved samples and PNGs are."""
    return from_uint8(to_uint8(x))


def get_checkpoint(args: argparse.Namespace) -> tuple[str, float | None]:
    if args.checkpoint:
        return args.checkpoint, None
    t0 = time.perf_counter()
    config = TrainConfig.from_values(dict(out_dir=args.out_dir, device=args.device))
    result = DiffusionRecipe(config, overwrite=True).run(progress=False)  # retrain
    return result["checkpoint"], time.perf_counter() - t0


def metrics_row(name: str, steps: int | None, feats: np.ndarray, test: np.ndarray,
                args: argparse.Namespace, seconds: float | None) -> dict:
    m = sample_metrics(feats, test, metrics=["fid", "kid", "pr"], kid_subsets=100,
                       kid_subset_size=args.kid_subset_size, k=3, seed=args.seed)
    return {"set": name, "steps": steps, "seconds": seconds, **m}


def sample_rows(denoiser, extractor, test_feats, args, device) -> list[dict]:
    rows = []
    labels = torch.arange(args.n) % 10
    for sampler, steps in CONFIGS:
        t0 = time.perf_counter()
        x = generate(denoiser, get_sampler(sampler), (1, 8, 8),
                     list(range(args.seed, args.seed + args.n)), labels=labels, steps=steps,
                     batch_size=args.batch_size, device=device, progress=False)
        seconds = time.perf_counter() - t0
        feats = extract(extractor, quantize(x)).features
        rows.append(metrics_row(sampler, steps, feats, test_feats, args, seconds))
        print(format_table(rows[-1:], COLUMNS), flush=True)
    return rows


def likelihood(pipe: Pipeline, test, args, device) -> dict:
    x, y = quantize(test.images), test.labels
    vlb_den = pipe.denoiser(clip=True)
    m = args.vlb_n or len(x)
    out = {"vlb": model_bits_per_dim(vlb_den, x[:m], y[:m], "vlb", 512, args.seed, device)}
    ode_den = pipe.denoiser(clip=False)
    n = args.ode_n
    out["ode"] = model_bits_per_dim(ode_den, x[:n], y[:n], "ode", n, args.seed, device,
                                    trace="hutchinson", probe="rademacher")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="skip training; use this checkpoint")
    ap.add_argument("--out-dir", default="runs/quality", help="run folder when training")
    ap.add_argument("--n", type=int, default=1000, help="samples per sampler configuration")
    ap.add_argument("--kid-subset-size", type=int, default=200)
    ap.add_argument("--classifier-steps", type=int, default=2000)
    ap.add_argument("--ode-n", type=int, default=128, help="test images for the ODE bits/dim")
    ap.add_argument("--vlb-n", type=int, default=None, help="test images for the VLB (all)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is much faster on a busy shared machine)")
    ap.add_argument("--json", default="benchmarks/quality.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ckpt, train_s = get_checkpoint(args)
    pipe = Pipeline.from_pretrained(ckpt, device=device)
    denoiser = pipe.denoiser()
    train, test = load_digits(8, split="train"), load_digits(8, split="test")
    clf = train_feature_net(train, steps=args.classifier_steps, device=device)
    clf_acc = accuracy(clf, test)
    clf_path = save_feature_net(clf, Path(args.out_dir) / "digits_classifier",
                               {"test_accuracy": clf_acc, "trained_on": "digits:train"})
    extractor = ModuleExtractor(clf.to(device), f"classifier ({clf_path.name})", device)
    test_feats = extract(extractor, quantize(test.images)).features
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.n]
    real = extract(extractor, quantize(train.images[idx])).features
    rows = [metrics_row("real (train split)", None, real, test_feats, args, None)]
    rows += sample_rows(denoiser, extractor, test_feats, args, device)
    bpd = likelihood(pipe, test, args, device)
    report = {"checkpoint": ckpt, "train_seconds": train_s, "device": str(device),
              "extractor": extractor.name, "classifier_test_accuracy": clf_acc,
              "n_samples": args.n, "n_test": len(test), "rows": rows, "bits_per_dim": bpd}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfeatures: {extractor.name}, test accuracy {clf_acc:.3f}; {args.n} samples vs "
          f"{len(test)} test digits; KID subsets of {min(args.kid_subset_size, len(test))}; "
          f"device {device}\n")
    print(format_table(rows, COLUMNS))
    v, o = bpd["vlb"], bpd["ode"]
    print(f"\n| bits/dim (test digits) | value | n |\n|---|---|---|\n"
          f"| VLB (beta_tilde, discretized decoder, all T terms) | {v['bits_per_dim']:.3f} ± "
          f"{v['stderr']:.3f} | {v['n']} |\n| ODE (dequantized, Hutchinson) | "
          f"{o['bits_per_dim']:.3f} ± {o['stderr']:.3f} | {o['n']} |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
