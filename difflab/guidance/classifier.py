"""Classifier guidance (Dhariwal & Nichol 2021) as a denoiser wrapper.

A classifier p_phi(y | x_t, t) trained on noisy images adds its gradient to the score:
grad log p(x_t | y) = grad log p(x_t) + s * grad log p_phi(y | x_t). Through
score = -eps / sigma this is, for every sampler, deterministic or not,

  eps_guided = eps - s * sigma_t * grad_x log p_phi(y | x_t, t)    (Dhariwal & Nichol, Alg. 2)

and x0_hat is recomputed from eps_guided (kept where alpha = 0: pure noise carries no x0).
The classifier may have been trained on another process than the diffusion model: times are
matched through the log-SNR, and x_t is rescaled to the classifier's process at that SNR,
x_c = r x_t with r = sigma_c / sigma = alpha_c / alpha (1 between VP processes; not 1 for
rectified flow or VE), so grad_x = r grad_{x_c}.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parameterization import DenoiserFn, Prediction
from ..process import Process, as_time, expand_like


def log_prob_grad(classifier: nn.Module, x: Tensor, c_noise: Tensor, y: Tensor) -> Tensor:
    """grad_x sum_i log p_phi(y_i | x_i), in x's dtype (each example's own gradient)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        param = next(classifier.parameters())
        logits = classifier(xg.to(param.dtype), c_noise.to(param.dtype))
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, xg)
    return grad


class ClassifierGuidance:
    """D_guided(x, t, y): the inner denoiser's eps pushed up log p_phi(y | x_t).

    ``classifier_process`` is the process the classifier was trained on (default: the
    denoiser's). ``condition_inner``: pass y on to the inner denoiser (a class-conditional
    model) or not (an unconditional one).
    """

    def __init__(self, denoiser: DenoiserFn, classifier: nn.Module, scale: float,
                 classifier_process: Process | None = None, condition_inner: bool = True):
        self.inner, self.classifier, self.scale = denoiser, classifier, scale
        self.process = denoiser.process
        self.classifier_process = classifier_process or denoiser.process
        self.condition_inner = condition_inner

    def classifier_c_noise(self, t: Tensor) -> Tensor:
        """The classifier's time input at the diffusion model's time t (same log-SNR)."""
        if self.classifier_process is self.process:
            return self.process.c_noise(t)
        t_c = self.classifier_process.t_from_log_snr(self.process.log_snr(t))
        return self.classifier_process.c_noise(t_c)

    def classifier_scale_of_x(self, t: Tensor) -> Tensor:
        """r [B] with x_c = r x_t: x_t on the classifier's process at the same log-SNR
        (sigma_c / sigma, or alpha_c / alpha where sigma = 0; 1 for the same process)."""
        if self.classifier_process is self.process:
            return torch.ones_like(as_time(t))
        alpha, sigma = self.process.alpha_sigma(t)
        a_c, s_c = self.classifier_process.rates_from_log_snr(self.process.log_snr(t))
        return torch.where(sigma > 0, s_c / sigma.clamp(min=1e-300), a_c / alpha)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        t = as_time(t, x)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        pred = self.inner(x, t, cond if self.condition_inner else None)
        if cond is None or self.scale == 0.0:
            return pred
        c_noise = self.classifier_c_noise(t).to(x.device)
        r = expand_like(self.classifier_scale_of_x(t), x)
        grad = r * log_prob_grad(self.classifier, r * x, c_noise, cond.to(x.device)).to(x.dtype)
        alpha, sigma = self.process.alpha_sigma(t)
        a, s = expand_like(alpha, x), expand_like(sigma, x)
        eps = pred.eps - self.scale * s * grad
        safe = torch.where(a > 0, a, torch.ones_like(a))
        return Prediction(x0=torch.where(a > 0, (x - s * eps) / safe, pred.x0), eps=eps)
