"""All sample-set metrics at once, from extracted features, as one JSON-able report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import FeatureStats, feature_stats, fid_from_stats, inception_score, kid
from .metrics import precision_recall as improved_pr

METRICS: tuple[str, ...] = ("fid", "kid", "is", "pr")


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec)]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metrics {bad or spec!r}; choose from {list(METRICS)}")
    return names


def sample_metrics(fake: np.ndarray, real: np.ndarray | None, *, metrics: Sequence[str] = METRICS,
                   fake_probs: np.ndarray | None = None, real_stats: FeatureStats | None = None,
                   kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = 3,
                   is_splits: int = 10, seed: int = 0) -> dict[str, Any]:
    """FID, KID (mean, std), IS (mean, std) and precision/recall of generated features
    ``fake`` [N, D] against real features ``real`` [M, D] (or only their ``real_stats`` for
    FID). Metrics that cannot be computed from what is given raise ``ValueError``."""
    out: dict[str, Any] = {"n_samples": int(fake.shape[0])}
    if real is not None:
        out["n_reference"] = int(real.shape[0])
    for name in metrics:
        if name == "is":
            if fake_probs is None:
                raise ValueError("the inception score needs an extractor with class outputs")
            out["is_mean"], out["is_std"] = inception_score(fake_probs, is_splits)
            continue
        if name == "fid":
            stats = real_stats or (feature_stats(real) if real is not None else None)
            if stats is None:
                raise ValueError("FID needs reference features or statistics")
            out["fid"] = fid_from_stats(feature_stats(fake), stats)
            continue
        if real is None:
            raise ValueError(f"{name} needs reference features (save the reference with its "
                             f"features, the default)")
        if name == "kid":
            out["kid_mean"], out["kid_std"] = kid(fake, real, kid_subsets, kid_subset_size, seed)
        elif name == "pr":
            out["precision"], out["recall"] = improved_pr(real, fake, k)
    return out


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``columns`` (missing values shown as '-')."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["METRICS", "format_table", "parse_metrics", "sample_metrics"]
