"""The fine-tuning step's loss: the base model's objective on the instance batch, plus
DreamBooth's weighted class loss (Ruiz et al. 2023, eq. 2) when a class batch comes with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..parameterization import Denoiser
from ..pipeline import Pipeline
from ..training import StepContext
from .diffusion import DiffusionLoss
from .dreambooth import PairedBatch

__all__ = ["FinetuneLoss", "base_denoiser"]


def base_denoiser(pipe: Pipeline, net: nn.Module) -> Denoiser:
    """``net`` read the way the base pipeline's diffusion stage reads its network."""
    st = pipe.stage
    return Denoiser(net, pipe.process, st.prediction, learned_variance=st.learned_variance,
                    sigma_data=st.sigma_data, base_prediction=st.base_prediction,
                    sigma_min=st.sigma_min, sigma_max=st.sigma_max)


@dataclass
class FinetuneLoss:
    """``loss(module, batch, ctx)`` for the loop: per-example instance losses [B] plus
    ``prior_weight`` times the class batch's mean loss.

    ``inner`` draws label dropout, times and noise (instance batch first, then the class
    batch, from the run's generator); ``network_of(module)`` is the network to call (the
    trained module itself, or the frozen base that adapters act on); ``table(module)``
    gives the function from a batch's labels to the denoiser's condition (for textual
    inversion it encodes the prompts with the module's current embedding, differentiably)."""

    inner: DiffusionLoss
    base: Pipeline
    network_of: Callable[[nn.Module], nn.Module]
    table: Callable[[nn.Module], Callable[[Tensor | None], Any]]
    prior_weight: float = 0.0

    def __call__(self, module: nn.Module, batch: PairedBatch, ctx: StepContext) -> Tensor:
        objective = self.inner.objective
        x, y, t, noise, w = self.inner.draw(batch.instance, ctx)
        cond_of = self.table(module)
        den = base_denoiser(self.base, self.network_of(module))
        loss = objective.loss(den, x, cond_of(y), t, noise, w).loss
        if batch.prior is not None:  # eq. 2: + lambda * the class-prior term
            xc, yc, tc, nc, wc = self.inner.draw(batch.prior, ctx)
            prior = objective.loss(den, xc, cond_of(yc), tc, nc, wc).loss
            loss = loss + self.prior_weight * prior.mean()
        return loss
