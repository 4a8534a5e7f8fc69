"""Sample-set metrics over feature arrays [N, D] (float64 numpy): FID, KID, IS, precision/recall.

Every function takes features that some extractor produced (InceptionV3 pool3, a small
classifier's penultimate layer, ...); the numbers are only comparable between runs that used
the same extractor, which is why every report names it.

- Fréchet distance (Heusel et al. 2017, eq. 6): d^2 = |mu1 - mu2|^2
  + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between the Gaussians fitted to the two feature sets.
- KID (Bińkowski et al. 2018, eq. 2-4): the unbiased estimator of the squared maximum mean
  discrepancy with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over random
  subsets (mean and standard deviation reported).
- Inception score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.
- Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-2): the share of generated
  samples inside the real manifold (union of k-NN balls around real features), and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_features(x: np.ndarray, name: str = "features") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be an [N >= 2, D] array, got shape {x.shape}")
    return x


@dataclass(frozen=True)
class FeatureStats:
    """Mean [D] and covariance [D, D] (unbiased, 1/(N-1)) of a feature set of size n."""

    mu: np.ndarray
    cov: np.ndarray
    n: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Fit the Gaussian of FID: sample mean and unbiased sample covariance."""
    f = _as_features(features)
    return FeatureStats(mu=f.mean(0), cov=np.cov(f, rowvar=False, ddof=1).reshape(
        f.shape[1], f.shape[1]), n=f.shape[0])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2; this avoids
    the complex, sometimes unstable general ``sqrtm`` of a non-symmetric product.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {cov1.shape} vs {cov2.shape}")
    r1 = _sqrtm_psd(cov1)
    m = r1 @ cov2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)
    return max(d2, 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.cov, b.mu, b.cov)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (Heusel et al. 2017)."""
    return fid_from_stats(feature_stats(features_a), feature_stats(features_b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef)^degree with gamma = 1/D by default (Bińkowski et al.)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel: float) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3): the diagonals of k(x, x), k(y, y) are left
    out, so the estimate is 0 in expectation when x and y come from the same distribution."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = (polynomial_kernel(x, x, **kernel), polynomial_kernel(y, y, **kernel),
                     polynomial_kernel(x, y, **kernel))
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0, degree: int = 3, gamma: float | None = None,
        coef: float = 1.0) -> tuple[float, float]:
    """Kernel inception distance: (mean, std) of the unbiased MMD^2 over ``subsets`` random
    subsets of ``min(subset_size, N_a, N_b)`` features drawn without replacement from each set.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)],
                          b[rng.choice(b.shape[0], m, replace=False)],
                          degree=degree, gamma=gamma, coef=coef) for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split (Salimans et al. 2016, sec. 4); returns the
    mean and standard deviation over ``splits`` consecutive splits. ``probs`` are [N, K]
    class probabilities (rows sum to 1)."""
    p = _as_features(probs, "probs")
    scores = []
    for part in np.array_split(p, max(1, min(splits, p.shape[0]))):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d2 = (x**2).sum(1)[:, None] + (y**2).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.clip(d2, 0, None))


def _in_manifold(ref: np.ndarray, query: np.ndarray, k: int, batch: int = 2048) -> np.ndarray:
    """For each query, whether it lies in some ball B(r, d_k(r)) around a reference point,
    where d_k(r) is the distance from r to its k-th nearest other reference point."""
    radii = np.empty(ref.shape[0])
    for s in range(0, ref.shape[0], batch):
        d = _pairwise_dist(ref[s:s + batch], ref)
        radii[s:s + batch] = np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    inside = np.zeros(query.shape[0], dtype=bool)
    for s in range(0, query.shape[0], batch):
        inside[s:s + batch] = (_pairwise_dist(query[s:s + batch], ref) <= radii[None]).any(1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-2) with k-NN radii."""
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if k >= min(r.shape[0], f.shape[0]):
        raise ValueError(f"k={k} needs more than k samples in each set, got {r.shape[0]} "
                         f"real and {f.shape[0]} generated")
    return float(_in_manifold(r, f, k).mean()), float(_in_manifold(f, r, k).mean())


__all__ = ["FeatureStats", "feature_stats", "fid", "fid_from_stats", "frechet_distance",
           "inception_score", "kid", "mmd2_unbiased", "polynomial_kernel", "precision_recall"]
