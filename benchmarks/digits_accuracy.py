"""Are a digits model's samples recognisable digits of the requested class?

Trains an independent classifier (scikit-learn SVC, RBF kernel) on the real 8x8 digits, then
samples ``--n`` images from a checkpoint, an equal number per requested label, and reports
the classifier's accuracy against the requested labels (its accuracy on held-out real digits
is printed as the ceiling).

    python benchmarks/digits_accuracy.py --checkpoint runs/digits --n 500
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from difflab.pipeline import Pipeline
from difflab.samplers import get_sampler
from difflab.samplers.generate import generate


def digit_classifier(seed: int = 0) -> tuple[SVC, float]:
    """SVC on 8x8 digits scaled to [0, 1]; returns it and its held-out accuracy."""
    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data / 16.0, d.target, test_size=0.25,
                                              random_state=seed, stratify=d.target)
    clf = SVC(gamma="scale", C=10.0).fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


def to_features(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images of any size -> 8x8 in [0, 1], flattened (area downsampling)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return x.flatten(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(args.checkpoint)
    denoiser = pipe.denoiser()
    clf, real_acc = digit_classifier()
    labels = torch.arange(args.n) % 10
    x = generate(denoiser, get_sampler(args.sampler), pipe.sample_shape,
                 list(range(args.seed, args.seed + args.n)), labels=labels, steps=args.steps)
    pred = clf.predict(to_features(x))
    acc = float((pred == labels.numpy()).mean())
    per_class = [float((pred[labels.numpy() == k] == k).mean()) for k in range(10)]
    print(json.dumps({"samples": args.n, "sampler": args.sampler, "steps": args.steps,
                      "accuracy": acc, "real_test_accuracy": real_acc,
                      "per_class": per_class}))
    print("| samples | sampler | steps | classifier accuracy on samples | on real test digits |")
    print("|---|---|---|---|---|")
    print(f"| {args.n} | {args.sampler} | {args.steps} | {acc:.3f} | {real_acc:.3f} |")


if __name__ == "__main__":
    main()
