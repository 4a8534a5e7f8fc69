"""Evaluation: sample-set metrics over pluggable features, and likelihood in bits/dim.

- :mod:`.metrics`: Fréchet distance / FID, KID, inception score, improved precision/recall.
- :mod:`.inception`: the FID InceptionV3 (weights from a local file only).
- :mod:`.featurenet`: the feature network, a small CNN trained on labelled data, used as the
  extractor on small domains; :mod:`.builtin`: the one trained and cached per data set.
- :mod:`.features`: the extractor interface, ``--features`` forms and ``extract``.
- :mod:`.reference`: sample sets (PNG folders, ``--save-npz`` files) and reference stats.
- :mod:`.likelihood`: the variational bound (DDPM) with the discretized Gaussian decoder.
- :mod:`.ode_likelihood`: exact likelihood through the probability-flow ODE.
- :mod:`.bits`: bits/dim of a model on a set of images, by either.
- :mod:`.shapes`, :mod:`.scenes`: attribute accuracy of samples of the procedural data sets.
"""

from .bits import model_bits_per_dim, vlb_evaluations
from .builtin import builtin_feature_net, cache_dir
from .featurenet import (
    FeatureNet,
    FeatureNetConfig,
    feature_net_accuracy,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from .features import (
    Extracted,
    FeatureExtractor,
    ModuleExtractor,
    NoisyClassifierFeatures,
    extract,
    parse_features,
)
from .inception import FIDInceptionV3, load_fid_inception
from .likelihood import (
    VLBResult,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
    vlb,
)
from .metrics import (
    FeatureStats,
    feature_stats,
    fid,
    frechet_distance,
    inception_score,
    kid,
    mmd2_unbiased,
    precision_recall,
)
from .ode_likelihood import ODEResult, dequantize, ode_bits_per_dim, ode_nll
from .reference import load_reference, load_sample_set, save_reference
from .report import METRICS, format_table, sample_metrics
from .scenes import scenes_accuracy

__all__ = [
    "METRICS", "Extracted", "FIDInceptionV3", "FeatureExtractor", "FeatureNet",
    "FeatureNetConfig", "FeatureStats", "ModuleExtractor", "NoisyClassifierFeatures",
    "ODEResult", "VLBResult", "builtin_feature_net", "cache_dir", "dequantize",
    "discretized_gaussian_log_likelihood", "extract", "feature_net_accuracy", "feature_stats",
    "fid", "format_table", "frechet_distance", "gaussian_log_likelihood", "inception_score",
    "kid", "load_feature_net", "load_fid_inception", "load_reference", "load_sample_set",
    "mmd2_unbiased", "model_bits_per_dim", "normal_kl", "ode_bits_per_dim", "ode_nll",
    "parse_features", "precision_recall", "sample_metrics", "save_feature_net",
    "save_reference", "scenes_accuracy", "train_feature_net", "vlb", "vlb_evaluations",
]
