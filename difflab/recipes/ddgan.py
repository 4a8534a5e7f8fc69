"""The denoising diffusion GAN (DDGAN; Xiao et al. 2022): ``difflab train --objective ddgan``.

T = ``--gan-steps`` large reverse steps on the trailing grid t_K > ... > t_1 > t_0 = 0 of the
run's process. Each step is a conditional GAN (Sec. 3, Algorithm 1 of the paper):

- real pairs: x_s ~ q(x_s | x0) and x_t ~ q(x_t | x_s) for adjacent grid times s < t;
- the generator predicts x0' = G(x_t, z, t, y) (z ~ N(0, I), ``networks.latent``: extra input
  channels of x's shape), and the fake x_s' ~ q(x_s | x_t, x0') is the forward process's
  posterior (eq. 6-7 of Ho et al. 2020 on the grid: :func:`posterior_coefficients`);
- the discriminator D(x_s, x_t, t, y) (a ``NoisyClassifier`` over the channel-concatenated
  pair; its class-y logit for class models) tells real from fake pairs: non-saturating loss
  softplus(-D(real)) + softplus(D(fake)) for D and softplus(-D(fake)) for G (eq. 5), and the
  R1 penalty (gamma / 2) |grad_{x_s} D(x_s, x_t, t)|^2 on real pairs.

Generator and discriminator are one module trained by the one loop (the split-gradient
construction of ``recipes.distill.gan``). The checkpoint loads as an ordinary pipeline: its
stage card holds the generator alone (``weights_prefix`` ``ema.generator``), prediction
``x0``, and the ``ddgan`` sampler with ``gan_steps`` steps (DDPM's posterior steps with a
fresh z per step from the sampling generator, so an image depends only on its seed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import LatentCond
from ..config import to_dict
from ..data import DataRequest, EpochSource, PointData, load_data
from ..networks import LatentUNet, LatentUNetConfig, NoisyClassifier
from ..networks.classifier import ClassifierConfig
from ..networks.fused import reference_ops
from ..pipeline import Conditions, ModelCard, Pipeline, StageCard
from ..process import Process, make_process
from ..samplers import time_grid
from ..training import LoopConfig, TrainLoop, init_device
from .config import TrainConfig
from .diffusion import loop_config
from .distill.gan import detached_call, nonsaturating_d_loss, nonsaturating_g_loss, r1_penalty
from .loop_recipe import LoopRecipe
from .networks import network_config

__all__ = ["DDGANLoss", "DDGANPair", "DDGANRecipe", "posterior_coefficients",
           "posterior_sample", "real_pair"]


def _b(v: Tensor, like: Tensor) -> Tensor:
    """A per-example [B] tensor shaped to broadcast against ``like``, in its dtype."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def posterior_coefficients(process: Process, t: Tensor, s: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """(c_x0, c_xt, var) of q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, var) for s < t [B]:
    with a_{t|s} = alpha_t / alpha_s and s2_{t|s} = sigma_t^2 - a_{t|s}^2 sigma_s^2,
    c_x0 = alpha_s s2_{t|s} / sigma_t^2, c_xt = a_{t|s} sigma_s^2 / sigma_t^2,
    var = s2_{t|s} sigma_s^2 / sigma_t^2 (Ho et al. 2020, eq. 6-7, on any grid)."""
    a_t, sig_t = process.alpha_sigma(t)
    a_s, sig_s = process.alpha_sigma(s)
    a_ts = a_t / a_s
    s2 = (sig_t**2 - a_ts**2 * sig_s**2).clamp(min=0)
    return a_s * s2 / sig_t**2, a_ts * sig_s**2 / sig_t**2, s2 * sig_s**2 / sig_t**2


def posterior_sample(process: Process, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor,
                     noise: Tensor) -> Tensor:
    """x_s = c_x0 x0 + c_xt x_t + sqrt(var) noise, a draw of q(x_s | x_t, x0)."""
    c0, ct, var = posterior_coefficients(process, t, s)
    return _b(c0, x0) * x0 + _b(ct, x0) * x_t + _b(var.sqrt(), x0) * noise


def real_pair(process: Process, x0: Tensor, t: Tensor, s: Tensor, e1: Tensor, e2: Tensor
              ) -> tuple[Tensor, Tensor]:
    """(x_s, x_t): x_s = alpha_s x0 + sigma_s e1, then x_t ~ q(x_t | x_s) =
    N(a_{t|s} x_s, sigma_t^2 - a_{t|s}^2 sigma_s^2) with noise e2."""
    a_t, sig_t = process.alpha_sigma(t)
    a_s, sig_s = process.alpha_sigma(s)
    a_ts = a_t / a_s
    x_s = _b(a_s, x0) * x0 + _b(sig_s, x0) * e1
    std = (sig_t**2 - a_ts**2 * sig_s**2).clamp(min=0).sqrt()
    return x_s, _b(a_ts, x0) * x_s + _b(std, x0) * e2


@dataclass(frozen=True)
class DDGANSetup:
    """What the pair reads but does not train."""

    process: Process
    r1_gamma: float


class DDGANPair(nn.Module):
    """Generator G(x_t, z, t, y) -> x0' and discriminator D(x_s, x_t, t, y) in one module;
    ``forward`` is the per-example L_G + L_D, split so that one backward trains each on its
    own loss (``recipes.distill.gan``)."""

    def __init__(self, generator: LatentUNet, disc: NoisyClassifier, conditional: bool):
        super().__init__()
        self.generator, self.disc, self.conditional = generator, disc, conditional

    def d_logit(self, x_s: Tensor, x_t: Tensor, c: Tensor, labels: Tensor | None,
                detached: bool = False) -> Tensor:
        """D's logit [B] of pairs: the class-y output of a class model, else output 0."""
        x = torch.cat([x_s, x_t], 1)
        out = detached_call(self.disc, x, c) if detached else self.disc(x, c)
        if self.conditional and labels is not None:
            return out.gather(1, labels.long()[:, None])[:, 0]
        return out[:, 0]

    def losses(self, x0: Tensor, labels: Tensor | None, t: Tensor, s: Tensor,
               noise: tuple[Tensor, Tensor, Tensor, Tensor], setup: DDGANSetup
               ) -> dict[str, Tensor]:
        """Per-example ``g`` (generator) and ``d``, ``r1`` (discriminator) terms."""
        e1, e2, z, e3 = noise
        p = setup.process
        x_s, x_t = real_pair(p, x0, t, s, e1, e2)
        c = p.c_noise(t).float()
        x0_fake = self.generator(x_t, c, LatentCond(labels, z))       # G(x_t, z, t)
        x_s_fake = posterior_sample(p, x0_fake, x_t, t, s, e3)        # q(x_s | x_t, x0')
        g = nonsaturating_g_loss(self.d_logit(x_s_fake, x_t, c, labels, detached=True))
        d_fake = self.d_logit(x_s_fake.detach(), x_t, c, labels)
        if setup.r1_gamma > 0:
            with reference_ops():  # R1 differentiates through D twice
                d_real, r1 = r1_penalty(lambda xs: self.d_logit(xs, x_t, c, labels), x_s)
        else:
            d_real, r1 = self.d_logit(x_s, x_t, c, labels), torch.zeros_like(g)
        return {"g": g, "d": nonsaturating_d_loss(d_real, d_fake), "r1": r1}

    def forward(self, x0: Tensor, labels: Tensor | None, t: Tensor, s: Tensor,
                noise: tuple[Tensor, Tensor, Tensor, Tensor], setup: DDGANSetup) -> Tensor:
        terms = self.losses(x0, labels, t, s, noise, setup)
        return terms["g"] + terms["d"] + 0.5 * setup.r1_gamma * terms["r1"]


class DDGANLoss:
    """The loop's loss: a step k of the grid per example (t = grid[k], s = grid[k + 1]) and
    the four noises (x_s, x_t, z, posterior draw), all from the run's generator."""

    def __init__(self, setup: DDGANSetup, grid: Tensor):
        self.setup, self.grid = setup, grid

    def __call__(self, module: nn.Module, batch: Any, ctx: Any) -> Tensor:
        g, dev, loc = ctx.generator, ctx.device, ctx.local
        x0, b = batch.x, len(batch.x)
        grid = self.grid.to(dev)
        k = torch.randint(len(grid) - 1, (b,), generator=g, device=dev)
        t, s = grid[k], grid[k + 1]
        noise = tuple(torch.randn(x0.shape, generator=g, device=dev)[loc] for _ in range(4))
        labels = None if batch.labels is None else batch.labels[loc]
        return module(x0[loc], labels, t[loc], s[loc], noise, self.setup)


def ddgan_networks(config: TrainConfig, shape: tuple[int, ...], num_classes: int | None
                   ) -> tuple[LatentUNetConfig, ClassifierConfig]:
    """The generator's config (the run's U-Net, latent channels added) and the
    discriminator's (a noisy classifier of the same widths over [x_s, x_t])."""
    unet = network_config("unet", config.network.unet, shape, False, num_classes, None)
    gen = LatentUNetConfig(unet=to_dict(unet))
    disc = ClassifierConfig(num_classes=num_classes or 1, in_channels=2 * shape[0],
                            image_size=shape[-1], base_channels=unet.base_channels,
                            channel_mult=tuple(unet.channel_mult), num_res_blocks=1)
    return gen, disc


class DDGANRecipe(LoopRecipe):
    """A DDGAN run from a :class:`TrainConfig` with ``objective.name == "ddgan"`` (module
    docstring); the interface ``difflab train`` uses (run, resume, sample_grid, step)."""

    def __init__(self, config: TrainConfig, data: Any = None, *, overwrite: bool = False):
        c, d, o = config, config.data, config.objective
        if o.gan_steps < 1:
            raise ValueError(f"--gan-steps must be at least 1, got {o.gan_steps}")
        if o.r1_gamma < 0:
            raise ValueError(f"--r1-gamma must be >= 0, got {o.r1_gamma}")
        self.config = config
        self.dist, self.device = init_device(c.run.device, c.speed.precision)
        self.data = data if data is not None else load_data(d.dataset, DataRequest(
            d.resolution, d.channels, points=d.toy_points, points_seed=c.run.seed))
        if isinstance(self.data, PointData):
            raise ValueError("--objective ddgan trains a U-Net generator on images; "
                             f"{d.dataset!r} gives 2-D points")
        x = self.data.images
        labels = (self.data.labels.to(self.device)
                  if d.class_conditional and self.data.labels is not None else None)
        self.num_classes = self.data.num_classes if labels is not None else None
        self.process = make_process(c.diffusion.schedule, c.diffusion.zero_terminal_snr,
                                    T=c.diffusion.T)
        self.grid = time_grid(self.process, o.gan_steps)
        torch.manual_seed(c.run.seed)  # the networks' initialisation
        gen_cfg, disc_cfg = ddgan_networks(c, tuple(x.shape[1:]), self.num_classes)
        pair = DDGANPair(LatentUNet(gen_cfg), NoisyClassifier(disc_cfg),
                         self.num_classes is not None).to(self.device)
        self.stage = StageCard(
            name="diffusion", network="latent_unet", network_config=asdict(gen_cfg),
            process=self.process.to_config(), prediction="x0",
            sample_shape=list(x.shape[1:]), weights="", weights_prefix="generator",
            data_range=[-1.0, 1.0], conditioning="class" if self.num_classes else "none",
            class_names=list(self.data.class_names) if self.num_classes else [],
            dataset=d.dataset, sampler="ddgan", sampler_steps=o.gan_steps)
        self.source = EpochSource(x.to(self.device), labels, c.optim.batch_size, c.run.seed)
        loss = DDGANLoss(DDGANSetup(self.process, o.r1_gamma), self.grid)
        lc: LoopConfig = loop_config(c, overwrite)
        self.loop = TrainLoop(lc, pair, self.source, loss, self.meta, self.dist, self.device,
                              callbacks=[lambda loop: self.sample_grid()])

    def meta(self) -> dict[str, Any]:
        """The run config and the generator's stage card (what loading relies on)."""
        return {"config": self.config.to_dict(), "stage": to_dict(self.stage),
                "grid": [float(t) for t in self.grid]}

    def pipeline(self) -> Pipeline:
        """The EMA generator as a pipeline (what loading the checkpoint gives)."""
        module = self.loop.ema.model if self.loop.ema is not None else self.loop.model
        card = ModelCard(stages=[StageCard(**{**vars(self.stage), "weights": "generator",
                                              "weights_prefix": ""})], step=self.step)
        return Pipeline(card, module.generator, self.device)

    def sample_grid(self, per_class: int = 10, seed: int = 0) -> Path:
        """Samples with the ddgan sampler: a row per class (or one row)."""
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        k = self.num_classes or 1
        rows = torch.arange(k).repeat_interleave(per_class)
        conds = (Conditions(len(rows), per_class, cond=rows, labels=rows)
                 if self.num_classes else Conditions(len(rows), per_class))
        return self.pipeline()(cond=conds, seed=seed).save_grid(path)
