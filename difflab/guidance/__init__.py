"""Guidance as denoiser wrappers: each returns another denoiser, so it works with every
sampler and every editing method."""

from .cfg import ClassifierFreeGuidance
from .classifier import ClassifierGuidance, log_prob_grad

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "log_prob_grad"]
