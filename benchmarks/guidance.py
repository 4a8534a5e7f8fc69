"""Guidance trade-off on the digits: condition accuracy vs diversity.

    python benchmarks/guidance.py --checkpoint runs/digits [--classifier runs/clf]

For classifier-free guidance scales gamma in {0, 1, 2, 3, 5} and a sweep of classifier-guidance
scales, samples ``--per-class`` digits of each class (DDIM, 50 steps, same seeds everywhere)
and reports the accuracy of an independent classifier (SVM on real digits,
benchmarks/digits_accuracy.py) against the requested class, and the diversity: mean pairwise
L2 distance between samples of the same class (real digits give the reference value).
Without --classifier, a noisy classifier is trained first (difflab train-classifier defaults).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from difflab.data import load_digits
from difflab.pipeline import Pipeline
from difflab.recipes.classifier import ClassifierTrainConfig, train_classifier
from difflab.samplers import ddim
from difflab.samplers.generate import generate

sys.path.insert(0, str(Path(__file__).parent))
from digits_accuracy import digit_classifier, to_features  # noqa: E402


def diversity(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance within each class, averaged over classes."""
    out = []
    for k in labels.unique():
        f = x[labels == k].flatten(1).double()
        d = torch.cdist(f, f)
        n = len(f)
        out.append(float(d.sum() / (n * (n - 1))))
    return sum(out) / len(out)


def evaluate(den, clf, labels: torch.Tensor, shape) -> tuple[float, float]:
    x = generate(den, ddim, shape, list(range(len(labels))), labels=labels, steps=50,
                 progress=False)
    acc = float((clf.predict(to_features(x)) == labels.numpy()).mean())
    return acc, diversity(x, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--cfg-scales", type=float, nargs="*", default=[0, 1, 2, 3, 5])
    ap.add_argument("--clf-scales", type=float, nargs="*", default=[0, 1, 2, 4, 8])
    args = ap.parse_args()
    if args.classifier is None:
        args.classifier = "runs/bench_classifier"
        print(train_classifier(ClassifierTrainConfig(out_dir=args.classifier),
                               progress=False, overwrite=True))
    svm, real_acc = digit_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    real = load_digits(8, split="test")
    print(f"real test digits: SVM accuracy {real_acc:.3f}, within-class diversity "
          f"{diversity(real.images, real.labels):.3f}\n")
    pipe = Pipeline.from_pretrained(args.checkpoint)
    shape = pipe.sample_shape
    print("| guidance | scale | accuracy | diversity |\n|---|---|---|---|")
    for g in args.cfg_scales:
        den = pipe.denoiser(guidance=g)
        acc, div = evaluate(den, svm, labels, shape)
        print(f"| classifier-free gamma | {g:g} | {acc:.3f} | {div:.3f} |")
    for s in args.clf_scales:
        den = pipe.denoiser(guidance=0.0, classifier=args.classifier, classifier_scale=s)
        acc, div = evaluate(den, svm, labels, shape)
        print(f"| classifier (on the unconditional model) | {s:g} | {acc:.3f} | {div:.3f} |")


if __name__ == "__main__":
    main()
