"""GAN pieces shared by adversarial distillation (ADD) and the denoising diffusion GAN:
losses, the R1 penalty, discriminator heads on frozen features, and the split-gradient call.

One optimiser, two players. The one loop (``difflab.training.TrainLoop``) has one AdamW over
one module; a GAN needs the generator's loss to move only the generator and the
discriminator's loss to move only the discriminator. Both are met in a single backward of
``loss_G + loss_D`` when

- the generator's loss reads the discriminator through :func:`detached_call` (its parameters
  detached, ``torch.func.functional_call``): gradients reach the fake images, not D; and
- the discriminator's loss reads detached fakes: no gradient reaches the generator.

Each parameter set then receives exactly the gradient of its own loss
(``tests/test_distill_adversarial.py`` checks it against two separate backward passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["ProjectionHeads", "detached_call", "hinge_d_loss", "hinge_g_loss",
           "nonsaturating_d_loss", "nonsaturating_g_loss", "r1_penalty", "unet_features"]


def detached_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args)`` with every parameter detached: gradients flow to the inputs only."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, params, args, kwargs, strict=False)


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator hinge loss per example: relu(1 - D(x)) + relu(1 + D(G(z))) (Lim & Ye
    2017; ADD, Sauer et al. 2023, eq. 3)."""
    return F.relu(1 - real) + F.relu(1 + fake)


def hinge_g_loss(fake: Tensor) -> Tensor:
    """Generator's hinge loss per example: -D(G(z)) (ADD, eq. 2)."""
    return -fake


def nonsaturating_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))) = softplus(-D(x)) + softplus(D(G(z)))
    (Goodfellow et al. 2014; DDGAN, Xiao et al. 2022, eq. 5)."""
    return F.softplus(-real) + F.softplus(fake)


def nonsaturating_g_loss(fake: Tensor) -> Tensor:
    """-log sigmoid(D(G(z))) = softplus(-D(G(z))) (the non-saturating generator loss)."""
    return F.softplus(-fake)


def r1_penalty(d: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(D(x), |grad_x D(x)|^2) per example at real data x (Mescheder et al. 2018, R1), the
    penalty with a graph so that it trains D; multiply it by gamma / 2. ``d`` maps [B, ...]
    to logits [B] (examples independently)."""
    x = x.detach().requires_grad_(True)
    logits = d(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return logits, grad.pow(2).flatten(1).sum(1)


def unet_features(net: nn.Module, x: Tensor, c_noise: Tensor) -> list[Tensor]:
    """Encoder activations of a difflab U-Net at noise conditioning ``c_noise`` (no label):
    the last block of each resolution of the down path, then the middle block. A frozen
    teacher's encoder is the discriminator's feature network here (ADD uses frozen ViT
    features; Sauer et al. 2023, Sec. 3.2)."""
    emb = net.embed(c_noise, None, x.shape[0])
    h = net.conv_in(x.to(net.conv_in.weight.dtype))
    by_size: dict[tuple[int, ...], Tensor] = {}
    for block in net.down:
        h = block(h, emb, None)
        by_size[tuple(h.shape[2:])] = h
    return [*by_size.values(), net.middle(h, emb, None)]


class ProjectionHeads(nn.Module):
    """Trainable discriminator heads, one per feature map, summed into one logit per example.

    Head k: a = LeakyReLU(conv1x1(f_k)); logit_k = mean_hw(conv1x1(a)) + <e_k(y), mean_hw(a)>,
    the projection discriminator's class term (Miyato & Koyama 2018) when ``num_classes``.
    """

    def __init__(self, channels: Sequence[int], hidden: int = 64,
                 num_classes: int | None = None, source: bool = False):
        super().__init__()
        self.mix = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in channels)
        self.out = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in channels)
        self.embed = (nn.ModuleList(nn.Embedding(num_classes, hidden) for _ in channels)
                      if num_classes else None)
        self.source = (nn.ModuleList(nn.Linear(c, hidden) for c in channels)
                       if source else None)

    def forward(self, feats: Sequence[Tensor], labels: Tensor | None = None,
                source: Sequence[Tensor] | None = None) -> Tensor:
        """Logits [B] of feature maps ``feats`` ([B, C_k, H_k, W_k]), class ``labels`` and,
        for heads built with ``source=True``, the feature maps ``source`` of a conditioning
        image (ADD's image conditioning, Sauer et al. 2023, Sec. 3.2: a projection term
        <W_k mean_hw(source_k), mean_hw(a_k)>)."""
        logit = 0
        for k, f in enumerate(feats):
            a = F.leaky_relu(self.mix[k](f), 0.2)
            logit = logit + self.out[k](a).mean((1, 2, 3))
            if self.embed is not None and labels is not None:
                logit = logit + (self.embed[k](labels) * a.mean((2, 3))).sum(1)
            if self.source is not None and source is not None:
                logit = logit + (self.source[k](source[k].mean((2, 3))) * a.mean((2, 3))).sum(1)
        return logit
