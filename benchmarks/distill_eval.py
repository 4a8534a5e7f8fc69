"""How ``benchmarks/distillation.py`` scores a pipeline at one sampler and step count.

- accuracy: the independent SVM of ``digits_accuracy.py`` (trained on scikit-learn's own 75 %
  split of the raw digits) against the requested class of each sample;
- FID in the feature space of difflab's built-in digits feature network (``difflab eval``'s
  default ``builtin`` features, trained on ``digits:train``) against ``digits:test``, the 359
  digits held out from that network (the default teacher trains on all 1797 digits, so no
  split is held out from the teacher itself);
- samples: class-balanced (labels 0..9 in turn), seeds ``seed .. seed + n - 1``, quantized to
  8 bits as saved images are.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.svm import SVC

from difflab.data import from_uint8, load_dataset, to_uint8
from difflab.evaluation import ModuleExtractor, builtin_feature_net, extract, sample_metrics
from difflab.evaluation.builtin import BUILTIN_STEPS
from difflab.evaluation.metrics import FeatureStats, feature_stats
from difflab.pipeline import Pipeline
from difflab.samplers import get_sampler
from difflab.samplers.base import CountingDenoiser
from difflab.samplers.generate import generate

sys.path.insert(0, str(Path(__file__).parent))
from digits_accuracy import digit_classifier, to_features  # noqa: E402

REFERENCE = "digits:test"


@dataclass
class Judge:
    """The two scorers and the reference statistics, built once per benchmark."""

    svm: SVC
    svm_real_accuracy: float
    extractor: ModuleExtractor
    reference: FeatureStats
    n_reference: int


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the 8-bit grid, as saved samples and PNGs are."""
    return from_uint8(to_uint8(x))


def make_judge(feature_steps: int = BUILTIN_STEPS, device: str = "cpu") -> Judge:
    """The SVM and the built-in digits feature network (trained on first use, then cached)
    with the feature statistics of the held-out ``digits:test``."""
    svm, real_acc = digit_classifier()
    net, name = builtin_feature_net("digits", 8, 1, steps=feature_steps)
    extractor = ModuleExtractor(net.to(device).eval(), name, device)
    test = load_dataset("digits", 8, 1, split="test")
    feats = extract(extractor, quantize(test.images)).features
    return Judge(svm, real_acc, extractor, feature_stats(feats), len(feats))


def score(judge: Judge, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy against ``labels`` and FID against the reference of samples ``x``."""
    x = quantize(x)
    acc = float((judge.svm.predict(to_features(x)) == labels.numpy()).mean())
    feats = extract(judge.extractor, x).features
    fid = sample_metrics(feats, None, metrics=["fid"], real_stats=judge.reference)["fid"]
    return {"accuracy": acc, "fid": float(fid)}


def nfe_of(pipe: Pipeline, sampler: str, steps: int, options: dict | None = None) -> int:
    """Network evaluations ``sampler`` spends at ``steps`` (counted on one sample)."""
    counted = CountingDenoiser(pipe.denoiser())
    generate(counted, get_sampler(sampler), pipe.sample_shape, [0],
             labels=torch.zeros(1, dtype=torch.long), steps=steps, device=pipe.device,
             progress=False, **(options or {}))
    return counted.nfe


def steps_for_nfe(pipe: Pipeline, sampler: str, nfe: int) -> tuple[int, int] | None:
    """(steps, NFE used) of the most steps whose NFE is at most ``nfe``; None if even one step
    costs more."""
    best = None
    for steps in range(1, nfe + 1):
        used = nfe_of(pipe, sampler, steps)
        if used > nfe:
            break
        best = (steps, used)
    return best


def sample_and_score(pipe: Pipeline, judge: Judge, sampler: str, steps: int, n: int,
                     seed: int = 1000, options: dict | None = None) -> dict:
    """Draw ``n`` class-balanced samples with ``sampler`` at ``steps`` and score them; also
    returns the samples (``x``, not for JSON) and the sampling wall time."""
    labels = torch.arange(n) % 10
    t0 = time.perf_counter()
    x = generate(pipe.denoiser(), get_sampler(sampler), pipe.sample_shape,
                 list(range(seed, seed + n)), labels=labels, steps=steps,
                 device=pipe.device, progress=False, **(options or {}))
    seconds = time.perf_counter() - t0
    return {"sampler": sampler, "steps": steps, "n": n, "seconds": seconds,
            **score(judge, x, labels), "x": x}


def real_floor(judge: Judge, n: int, seed: int = 0) -> dict:
    """The same scores of ``n`` random train digits: the FID floor at this sample size."""
    train = load_dataset("digits", 8, 1, split="train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    idx = idx[:n] if n <= len(train) else idx[torch.arange(n) % len(train)]
    return score(judge, train.images[idx], train.labels[idx])


__all__ = ["REFERENCE", "Judge", "make_judge", "nfe_of", "quantize", "real_floor",
           "sample_and_score", "score", "steps_for_nfe"]
