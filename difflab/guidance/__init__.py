"""Guidance as denoiser wrappers: each returns another denoiser, so it works with every
sampler and every editing method."""

from .as_input import GuidanceInput, ScaleInputCFG
from .cfg import ClassifierFreeGuidance
from .classifier import ClassifierGuidance, log_prob_grad

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "GuidanceInput", "ScaleInputCFG",
           "log_prob_grad"]
