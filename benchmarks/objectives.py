"""Training objectives compared on the digits: same model, data and budget for each.

Trains five class-conditional tiny U-Nets (the README's default ``TrainConfig`` except for
the objective and ``--steps``): L_simple-eps, v-prediction (v-space MSE), min-SNR-5 (eps
prediction), hybrid with learned variance (Nichol & Dhariwal 2021) and EDM (preconditioning,
log-normal noise levels, lambda(sigma)), all on the cosine schedule with T = 1000. Then, per
model: FID in the digits feature network's space (``difflab eval --features featurenet:``)
of ``--n`` class-balanced samples against the held-out test digits, for DDPM ancestral
sampling (learned Sigma_theta for the hybrid model, beta_tilde otherwise; trailing spacing)
at 10, 25, 50 and 1000 steps and DDIM (eta = 0) at 10, 25 and 50 steps; and bits/dim of the
test digits by the variational bound (``difflab nll``: discretized decoder, learned variance
where the model has one, else beta_tilde; a stratified unbiased estimate over ``--vlb-steps``
terms). Prints a markdown table and writes JSON.

    python benchmarks/objectives.py --steps 700 --threads 1            # train, then evaluate
    python benchmarks/objectives.py --steps 700 --threads 1 --skip-train
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difflab.data import from_uint8, load_digits, to_uint8
from difflab.evaluation import (
    ModuleExtractor,
    extract,
    format_table,
    load_feature_net,
    model_bits_per_dim,
    sample_metrics,
    save_feature_net,
    train_feature_net,
)
from difflab.evaluation.featurenet import feature_net_accuracy as accuracy
from difflab.parameterization import Prediction
from difflab.pipeline import Pipeline
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.samplers import get_sampler
from difflab.samplers.generate import generate

#: name -> TrainConfig overrides
MODELS: dict[str, dict] = {
    "simple-eps": {},
    "v-prediction": {"prediction": "v"},
    "min-SNR-5": {"weighting": "min_snr", "min_snr_gamma": 5.0},
    "hybrid (learned var)": {"objective": "hybrid"},
    "EDM": {"objective": "edm", "prediction": "edm"},
}
CONFIGS = [("ddpm", 10), ("ddpm", 25), ("ddpm", 50), ("ddim", 10), ("ddim", 25), ("ddim", 50)]
#: the hybrid model sampled and scored with the fixed beta_tilde instead of Sigma_theta
ABLATION = "hybrid, fixed beta_tilde"
LONG = ("ddpm", 1000)  # evaluated last, on --n-long samples (CPU time)


def run_dir(root: Path, name: str) -> Path:
    return root / name.split(" ")[0].strip(",").lower()


class FixedVariance:
    """A learned-variance denoiser seen without its variance (samplers and the VLB then use
    their fixed beta_tilde): isolates what Sigma_theta does."""

    def __init__(self, inner):
        self.inner, self.process = inner, inner.process

    def __call__(self, x, t, cond=None):
        p = self.inner(x, t, cond)
        return Prediction(p.x0, p.eps)


def train_all(args: argparse.Namespace) -> dict[str, float]:
    """Train every model not yet trained; returns training CPU seconds per model."""
    seconds = {}
    for name, overrides in MODELS.items():
        if name not in args.models:
            continue
        out = run_dir(Path(args.out_dir), name)
        if (out / "checkpoints").is_dir():
            continue
        cfg = TrainConfig.from_values(dict(out_dir=str(out), steps=args.steps, sample_every=0,
                          checkpoint_every=0, device=args.device, **overrides))
        t0 = time.process_time()
        DiffusionRecipe(cfg).run(progress=False)
        seconds[name] = time.process_time() - t0
        print(f"trained {name} in {seconds[name]:.0f} s CPU", flush=True)
    return seconds


def quantize(x: torch.Tensor) -> torch.Tensor:
    return from_uint8(to_uint8(x))


def feature_extractor(args: argparse.Namespace):
    path = Path(args.out_dir) / "digits_classifier.json"
    test = load_digits(8, split="test")
    if path.is_file():
        clf, _ = load_feature_net(path)
    else:
        clf = train_feature_net(load_digits(8, split="train"), steps=args.classifier_steps)
        save_feature_net(clf, path.with_suffix(""), {"test_accuracy": accuracy(clf, test)})
    ex = ModuleExtractor(clf, f"classifier ({path.name})", "cpu")
    return ex, test, float(accuracy(clf, test))


def evaluate(name: str, args: argparse.Namespace, extractor, test, test_feats) -> dict:
    """FID per sampler configuration and bits/dim of one model; results are kept in
    ``<run>/objectives_eval.json`` after every column, so reruns resume where they stopped."""
    ckpt = run_dir(Path(args.out_dir), name)
    path = ckpt / ("objectives_eval_fixed.json" if name == ABLATION else "objectives_eval.json")
    row: dict = json.loads(path.read_text()) if path.is_file() else {"model": name}
    if row.get("n") not in (None, args.n):
        row = {"model": name}
    row["n"], row["n_long"] = args.n, args.n_long
    pipe = Pipeline.from_pretrained(ckpt)
    den = pipe.denoiser()
    row["train_steps"] = pipe.card.training.get("optim", pipe.card.training)["steps"]
    configs = CONFIGS
    if name == ABLATION:  # DDIM never uses the variance: only the ancestral columns differ
        den, configs = FixedVariance(den), [c for c in CONFIGS if c[0] == "ddpm"]

    def fid_column(sampler: str, steps: int, n: int) -> None:
        key = f"{sampler}-{steps}"
        if key in row:
            return
        x = generate(den, get_sampler(sampler), (1, 8, 8),
                     list(range(args.seed, args.seed + n)), labels=torch.arange(n) % 10,
                     steps=steps, batch_size=n, progress=False)
        feats = extract(extractor, quantize(x)).features
        row[key] = sample_metrics(feats, test_feats, metrics=["fid"])["fid"]
        print(name, sampler, steps, n, row[key], flush=True)
        path.write_text(json.dumps(row, indent=1) + "\n")

    for sampler, steps in configs:
        fid_column(sampler, steps, args.n)
    if "bits/dim" not in row:
        bpd = model_bits_per_dim(den, quantize(test.images), test.labels, "vlb", 512,
                                 args.seed, steps=args.vlb_steps)
        row["bits/dim"], row["bpd stderr"] = bpd["bits_per_dim"], bpd["stderr"]
        path.write_text(json.dumps(row, indent=1) + "\n")
    if args.n_long > 0 and name != ABLATION:
        fid_column(*LONG, args.n_long)
    return row


def real_row(args: argparse.Namespace, extractor, test_feats) -> dict:
    """The noise floor: FID of random train digits (as many as the samples) vs the test split."""
    train = load_digits(8, split="train")
    row: dict = {"model": "real digits (train split)", "train_steps": 0}
    for key, n in (("ddpm-10", args.n), ("-".join(map(str, LONG)), args.n_long)):
        if n > 0:
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
            feats = extract(extractor, quantize(train.images[idx])).features
            row[key] = sample_metrics(feats, test_feats, metrics=["fid"])["fid"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps of every model")
    ap.add_argument("--out-dir", default="runs/objectives")
    ap.add_argument("--n", type=int, default=200, help="samples per FID")
    ap.add_argument("--n-long", type=int, default=100,
                    help="samples for the 1000-step FID (0: skip that column)")
    ap.add_argument("--vlb-steps", type=int, default=32,
                    help="stratified VLB terms per image for bits/dim (None: all T)")
    ap.add_argument("--classifier-steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated subset of the models (to train in parallel jobs)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--ablation", action="store_true",
                    help=f"also evaluate {ABLATION!r} (the hybrid model without Sigma_theta)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--json", default="benchmarks/objectives.json")
    args = ap.parse_args()
    args.models = args.models.split(",")
    unknown = set(args.models) - set(MODELS) - {ABLATION}
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_s = {} if args.skip_train else train_all(args)
    args.models = [m for m in args.models if m != ABLATION]
    if args.train_only:
        return
    extractor, test, clf_acc = feature_extractor(args)
    test_feats = extract(extractor, quantize(test.images)).features
    names = args.models + ([ABLATION] if args.ablation else [])
    rows = [real_row(args, extractor, test_feats)]
    rows += [evaluate(name, args, extractor, test, test_feats) for name in names]
    cols = (["model"] + [f"{s}-{k}" for s, k in CONFIGS] + ["-".join(map(str, LONG))]
            + ["bits/dim", "bpd stderr"])
    report = {"steps": args.steps, "n": args.n, "classifier_test_accuracy": clf_acc,
              "vlb_steps": args.vlb_steps, "train_cpu_seconds": train_s, "rows": rows}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nFID (classifier features, test acc {clf_acc:.3f}), {args.n} samples vs "
          f"{len(test)} test digits ({args.n_long} for 1000 steps); models trained "
          f"{sorted({r['train_steps'] for r in rows[1:]})} steps; the real-data row's FID "
          f"is under ddpm-10 ({args.n} images) and ddpm-1000 ({args.n_long})\n")
    print(format_table(rows, cols))


if __name__ == "__main__":
    main()
