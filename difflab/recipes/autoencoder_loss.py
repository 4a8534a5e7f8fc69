"""The autoencoder's training loss: reconstruction, regulariser and the patch GAN.

Per example, with n = C H W the image's size (Rombach et al. 2022, App. G; Esser et al. 2021,
eq. 5-7):

- L_rec = mean over pixels of |x - D(z)| (``l1``) or (x - D(z))^2 (``l2``), z ~ q(z | x);
- L_reg = kl_weight KL(q(z|x) || N(0, I)) / n for the KL autoencoder: LDM sums its
  reconstruction loss over pixels and weighs the summed KL by ~1e-6; dividing both by n keeps
  that balance (so ``kl_weight`` means what it means in LDM) at a per-pixel scale that the
  usual learning rates fit. VQ: vq_weight (codebook + commitment loss), as VQGAN adds it to
  its per-pixel mean reconstruction loss;
- L_G = lambda_adv (-mean over patches of D_patch(D(z))) from ``disc_start`` on, with
  lambda_adv = disc_weight * ||grad_{w_L} L_rec|| / (||grad_{w_L} L_G|| + 1e-6) (VQGAN's
  adaptive weight, eq. 7: w_L the decoder's last layer; clamped to [0, 1e4] and detached), or
  disc_weight alone with ``adaptive=False``;
- L_D = 0.5 (mean relu(1 - D_patch(x)) + mean relu(1 + D_patch(sg(D(z))))) (hinge) from
  ``disc_start`` on; before it the discriminator has no loss and the total is L_rec + L_reg.

Both players are children of one module (:class:`AutoencoderPair`), trained by the one loop
and optimiser through the split-gradient construction of ``recipes.distill.gan``: the
generator reads the discriminator through :func:`detached_call`, the discriminator reads
detached reconstructions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..evaluation.psnr import psnr
from ..networks.patch_discriminator import PatchDiscriminator
from .distill.gan import detached_call, hinge_d_loss, hinge_g_loss

__all__ = ["AutoencoderPair", "LossWeights", "PairStep", "adaptive_weight",
           "decoder_last_layer", "psnr", "reconstruction_loss"]

#: delta of VQGAN's adaptive weight (eq. 7) and the clamp of the weight (LDM's code)
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-6, 1e4


def reconstruction_loss(x: Tensor, rec: Tensor, kind: Literal["l1", "l2"]) -> Tensor:
    """Mean over each image's pixels of |x - rec| (``l1``) or (x - rec)^2 (``l2``) [B]."""
    diff = (rec - x).flatten(1)
    return diff.abs().mean(1) if kind == "l1" else diff.pow(2).mean(1)


def decoder_last_layer(autoencoder: nn.Module) -> Tensor:
    """The weight of the decoder's output convolution (``decoder.conv_out``, the diffusers
    name; else the decoder's last convolution): where the adaptive weight compares
    gradients."""
    dec = getattr(autoencoder, "decoder", autoencoder)
    conv = getattr(dec, "conv_out", None)
    if isinstance(conv, nn.Conv2d):
        return conv.weight
    convs = [m for m in dec.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the autoencoder's decoder has no convolution for the adaptive "
                         "GAN weight; use --no-adaptive-weight")
    return convs[-1].weight


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor,
                    reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """||grad_w rec_loss|| / (||grad_w g_loss|| + delta), clamped to [0, 1e4], detached
    (VQGAN, Esser et al. 2021, eq. 7): the GAN term then moves the decoder's last layer as
    much as the reconstruction does, whatever their scales. Scalar losses; the graphs are
    kept for the backward pass. ``reduce`` (DDP: the mean over ranks) turns each rank's
    gradients into the global batch's before the norms are taken."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    if reduce is not None:
        g_rec, g_adv = reduce(g_rec), reduce(g_adv)
    ratio = g_rec.float().norm() / (g_adv.float().norm() + ADAPTIVE_EPS)
    return ratio.clamp(0.0, ADAPTIVE_MAX).detach()


@dataclass(frozen=True)
class LossWeights:
    """The loss's settings (module docstring)."""

    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    vq_weight: float = 1.0
    disc_weight: float = 0.5
    adaptive: bool = True


@dataclass(frozen=True)
class PairStep:
    """What one step's call of the pair needs besides the images and the weights."""

    disc_on: bool                                 # the discriminator is trained and read
    generator: torch.Generator | None = None      # draws the posterior noise
    rows: slice = field(default_factory=lambda: slice(None))  # this rank's rows (DDP)
    batch: int | None = None                      # the global batch size (None: len(x))
    reduce: Callable[[Tensor], Tensor] | None = None  # DDP: mean of a tensor over ranks


class AutoencoderPair(nn.Module):
    """The autoencoder (generator) and the patch discriminator (or none) in one module; the
    autoencoder's tensors sit under ``autoencoder.``, the discriminator's under
    ``discriminator.``. ``forward`` returns the per-example loss L_G + L_D and its terms."""

    def __init__(self, autoencoder: nn.Module, discriminator: PatchDiscriminator | None):
        super().__init__()
        self.autoencoder, self.discriminator = autoencoder, discriminator

    def regulariser(self, reg_loss: Tensor, x: Tensor, w: LossWeights) -> Tensor:
        """L_reg per example: KL / n times kl_weight, or the VQ loss times vq_weight."""
        if self.autoencoder.config.regularizer == "vq":
            return w.vq_weight * reg_loss
        return w.kl_weight * reg_loss / math.prod(x.shape[1:])

    def sample(self, x: Tensor, s: PairStep) -> tuple[Tensor, Any]:
        """(decode(z), q(z | x)) with z = mean + exp(logvar / 2) eps (VQ: z = mean); eps is
        drawn in float32 for the global batch and sliced to this rank's rows, so that the
        noise an image gets does not depend on the number of ranks."""
        q = self.autoencoder.encode(x)
        z = q.mean
        if q.logvar is not None:
            g = s.generator
            eps = torch.randn((s.batch or len(x), *z.shape[1:]), generator=g,
                              device=g.device if g is not None else z.device)[s.rows]
            z = z + torch.exp(0.5 * q.logvar) * eps.to(z.device, z.dtype)
        return self.autoencoder.decode(z), q

    def forward(self, x: Tensor, w: LossWeights, s: PairStep
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss [B], terms): ``rec``, ``reg`` (the raw KL or VQ loss), ``psnr`` and, with a
        discriminator, ``g_adv``, ``d_adv``, ``d_weight`` (detached [B] or scalars)."""
        rec, posterior = self.sample(x, s)
        l_rec = reconstruction_loss(x, rec, w.reconstruction)
        loss = l_rec + self.regulariser(posterior.reg_loss, x, w)
        terms = {"rec": l_rec.detach(), "reg": posterior.reg_loss.detach(),
                 "psnr": psnr(x, rec.detach())}
        d = self.discriminator
        if d is None:
            return loss, terms
        if not s.disc_on:  # zero-valued gradients keep DDP's every-parameter reduction whole
            zero = sum(p.sum() for p in d.parameters()) * 0.0
            return loss + zero, terms | {"g_adv": torch.zeros_like(l_rec),
                                         "d_adv": torch.zeros_like(l_rec),
                                         "d_weight": torch.zeros(())}
        g_adv = hinge_g_loss(detached_call(d, rec)).flatten(1).mean(1)  # D fixed
        lam = torch.tensor(w.disc_weight, device=x.device)
        if w.adaptive and torch.is_grad_enabled():
            last = decoder_last_layer(self.autoencoder)
            lam = lam * adaptive_weight(l_rec.mean(), g_adv.mean(), last, s.reduce)
        logits = d(torch.cat([x, rec.detach()]))                       # G fixed
        real, fake = logits.chunk(2)
        d_adv = 0.5 * hinge_d_loss(real, fake).flatten(1).mean(1)
        terms |= {"g_adv": g_adv.detach(), "d_adv": d_adv.detach(), "d_weight": lam}
        return loss + lam * g_adv + d_adv, terms
