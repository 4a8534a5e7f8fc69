"""The autoencoder recipe: the first stage of latent diffusion (Rombach et al. 2022, Sec. 3).

It trains :class:`difflab.networks.autoencoder.Autoencoder` (KL- or VQ-regularised) with an
L1/L2 reconstruction loss and, from ``disc_start`` on, a patch discriminator
(``autoencoder_loss``), on the one loop (:class:`difflab.training.TrainLoop`). The trained
module holds the autoencoder under ``autoencoder.`` and the discriminator under
``discriminator.``.

Every checkpoint's metadata holds what loading the autoencoder needs without the data
(:meth:`AutoencoderRecipe.meta`): its network config, sample shape, data range and the
latent scale factor -- 1 / std of the EMA encoder's latents on up to ``scale_images``
training images (:func:`estimate_latent_scale`), as Stable Diffusion's 0.18215 was found.
metrics.jsonl holds, besides the loop's lines, a line of loss terms and training PSNR per
logging interval and the held-out PSNR at each reconstruction grid (``samples/``).

Randomness: the network's initialisation (global RNG seeded by ``seed``), then per step the
posterior noise of z ~ q(z | x) from the run's generator, drawn for the global batch and
sliced (under torchrun each rank keeps its rows; with the adaptive weight's gradients averaged
over ranks, a DDP run is the single-process run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import to_dict
from ..data import DataRequest, EpochSource, ImageData, load_data, save_labelled_grid
from ..io import append_text
from ..networks.autoencoder import Autoencoder
from ..networks.patch_discriminator import PatchDiscriminator
from ..training import StepContext, TrainLoop, init_device
from ..training.distributed import DistInfo, check_divisible, mean_over_ranks
from .autoencoder_config import AutoencoderDataConfig, AutoencoderTrainConfig
from .autoencoder_loss import AutoencoderPair, LossWeights, PairStep, psnr
from .diffusion import loop_config
from .loop_recipe import LoopRecipe

__all__ = ["AutoencoderLoss", "AutoencoderRecipe", "AutoencoderTrainConfig",
           "estimate_latent_scale", "psnr", "reconstruct"]

#: where the autoencoder's tensors sit inside the trained module
WEIGHTS_PREFIX = "autoencoder"


@torch.no_grad()
def estimate_latent_scale(autoencoder: Autoencoder, images: Tensor, *,
                          posterior: str = "sample", shift: bool = False,
                          max_images: int = 1000, batch_size: int = 250
                          ) -> tuple[float, float]:
    """(scale, shift) such that (z - shift) * scale has unit variance over the first
    ``max_images`` of ``images`` (Rombach et al. 2022, Sec. 4.3.2; LDM's ``scale_by_std``).

    z are the encoder's posterior means (``posterior="mean"``; VQ: the quantised latents) or
    its samples (``"sample"``): their variance, in closed form rather than from one draw, is
    Var(mean) + E[exp(logvar)] (law of total variance over images, latent elements and the
    posterior's noise). Variances are over all latent elements (population, float64).
    ``shift``: the latents' mean (SD3's shift factor); otherwise 0.

    Raises:
        ValueError: the latents have zero or non-finite variance.
    """
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    s1 = s2 = noise = 0.0
    count = 0
    try:
        for x in images[:max_images].split(batch_size):
            q = autoencoder.encode(x.to(device, torch.float32))
            m = q.mean.double()
            s1, s2, count = s1 + m.sum(), s2 + m.pow(2).sum(), count + m.numel()
            if posterior == "sample" and q.logvar is not None:
                noise = noise + q.logvar.double().exp().sum()
    finally:
        autoencoder.train(was_training)
    mean = s1 / count
    var = s2 / count - mean**2 + noise / count
    std = float(var.clamp(min=0).sqrt())
    if not 0 < std < float("inf"):
        raise ValueError(f"the encoder's latents have standard deviation {std}: no scale "
                         f"factor")
    return 1.0 / std, float(mean) if shift else 0.0


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, images: Tensor, batch_size: int = 250) -> Tensor:
    """Deterministic reconstructions decode(mode(encode(x))) [N, C, H, W] (eval mode)."""
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    try:
        out = [autoencoder.decode(autoencoder.encode(x.to(device)).mode()).float().cpu()
               for x in images.split(batch_size)]
    finally:
        autoencoder.train(was_training)
    return torch.cat(out)


@dataclass
class TermLog:
    """Loss terms kept on the device per step (no host sync) until the next metric line."""

    sums: dict[str, list[Tensor]] = field(default_factory=dict)

    def add(self, terms: dict[str, Tensor]) -> None:
        for k, v in terms.items():
            self.sums.setdefault(k, []).append(v.detach().float().mean())

    def read(self, dist: DistInfo) -> dict[str, float]:
        """Means over the interval and the ranks (a collective: every rank calls it)."""
        out = {k: float(mean_over_ranks(torch.stack(v).mean(), dist))
               for k, v in self.sums.items()}
        self.sums = {}
        return out


@dataclass
class AutoencoderLoop(TrainLoop):
    """The one loop, with a line of loss terms after each of its metric lines."""

    terms: TermLog | None = None

    def _log(self, path: Path, losses: list[Tensor], items: int,
             seconds: float) -> dict[str, Any]:
        row = super()._log(path, losses, items, seconds)
        extra = self.terms.read(self.dist) if self.terms is not None else {}
        if extra and self.dist.is_main:
            line = {"step": self.step, **extra, "time": row["time"]}
            append_text(path, json.dumps(line) + "\n")
            for sink in self._sinks:
                sink.write(line)
        return row | extra


class AutoencoderLoss:
    """The loop's loss: this rank's images through the pair (posterior noise drawn for the
    global batch), the discriminator on from ``disc_start``; the terms go to ``log``."""

    def __init__(self, weights: LossWeights, disc_start: int, log: TermLog,
                 channels_last: bool = True, dist: DistInfo | None = None):
        self.weights, self.disc_start, self.log = weights, disc_start, log
        self.channels_last, self.dist = channels_last, dist

    def __call__(self, module: nn.Module, batch: Any, ctx: StepContext) -> Tensor:
        x = batch.x[ctx.local]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dist = self.dist
        reduce = (lambda t: mean_over_ranks(t, dist)) if dist is not None and dist.enabled \
            else None
        step = PairStep(ctx.step >= self.disc_start, ctx.generator, ctx.local, len(batch),
                        reduce)
        loss, terms = module(x, self.weights, step)
        self.log.add(terms)
        return loss


def load_images(d: AutoencoderDataConfig, split: str) -> ImageData:
    """A split ("train" or "test") of the run's data set; ValueError for point data."""
    data = load_data(d.dataset, DataRequest(d.resolution, d.channels, split=split))
    if not isinstance(data, ImageData):
        raise ValueError(f"--dataset {d.dataset}: an autoencoder needs images, not points")
    return data


class AutoencoderRecipe(LoopRecipe):
    """An autoencoder run built from ``config`` (``data`` replaces the named data set's train
    split, ``test_data`` its test split -- without either, held-out PSNR is measured on the
    training images; ``overwrite`` as :class:`difflab.recipes.DiffusionRecipe`).

    ``run()``, ``resume()``, ``save()`` and the state (``net``, ``ema``, ``opt``, ``step``)
    are the loop's; ``autoencoder`` is the EMA autoencoder (what a checkpoint loads as)."""

    def __init__(self, config: AutoencoderTrainConfig, data: ImageData | None = None, *,
                 overwrite: bool = False, test_data: ImageData | None = None):
        self.dist, self.device = init_device(config.run.device, config.speed.precision)
        check_divisible(config.optim.batch_size, self.dist)
        d = config.data
        self.data = data if data is not None else load_images(d, "train")
        if data is None and test_data is None:
            test_data = load_images(d, "test")
        self.test_images = (test_data if test_data is not None else self.data).images
        self.held_out = test_data is not None
        x = self.data.images
        self.config = config = self._derive(config, x.shape[1])
        f = config.network.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"--resolution {d.resolution}: images of {list(x.shape[2:])} px "
                             f"are not a multiple of the down-sampling factor {f} "
                             f"(2**(len(--block-out-channels) - 1))")
        c, lc = config, config.loss
        torch.manual_seed(c.run.seed)  # the initialisation: the one global-RNG draw
        disc = None
        if lc.disc_weight > 0:
            disc = PatchDiscriminator(lc.discriminator)
            if min(x.shape[2:]) < disc.min_size:
                raise ValueError(f"--disc-layers {lc.discriminator.layers} needs images of at "
                                 f"least {disc.min_size} px (--resolution {d.resolution}); "
                                 f"lower it or turn the discriminator off with "
                                 f"--disc-weight 0")
        pair = AutoencoderPair(Autoencoder(c.network), disc).to(self.device)
        if c.speed.channels_last:
            pair = pair.to(memory_format=torch.channels_last)
        self.terms = TermLog()
        weights = LossWeights(lc.reconstruction, lc.kl_weight, lc.vq_weight, lc.disc_weight,
                              lc.adaptive_weight)
        self.loss = AutoencoderLoss(weights, lc.disc_start, self.terms, c.speed.channels_last,
                                    self.dist)
        self.source = EpochSource(x.to(self.device), None, c.optim.batch_size, c.run.seed)
        self.loop = AutoencoderLoop(loop_config(c, overwrite), pair, self.source, self.loss,
                                    self.meta, self.dist, self.device,
                                    callbacks=[lambda loop: self.reconstruction_grid()],
                                    terms=self.terms)
        self._scale: tuple[int, tuple[float, float]] | None = None

    @staticmethod
    def _derive(config: AutoencoderTrainConfig, channels: int) -> AutoencoderTrainConfig:
        """The config with the network's and discriminator's channels set from the data."""
        net = replace(config.network, in_channels=channels)
        disc = replace(config.loss.discriminator, in_channels=channels)
        return replace(config, network=net, loss=replace(config.loss, discriminator=disc))

    # -- the loop's state -------------------------------------------------------------------
    @property
    def autoencoder(self) -> Autoencoder:
        """The EMA autoencoder (what the checkpoint's ``ema.autoencoder.*`` tensors hold)."""
        return self.loop.ema.model.autoencoder

    # -- checkpoints, PSNR and grids ---------------------------------------------------------
    def latent_scale(self) -> tuple[float, float]:
        """(scale, shift) of the EMA encoder at this step (:func:`estimate_latent_scale`;
        computed once per step)."""
        if self._scale is None or self._scale[0] != self.step:
            lc = self.config.latent
            self._scale = (self.step, estimate_latent_scale(
                self.autoencoder, self.data.images, posterior=lc.scale_posterior,
                shift=lc.latent_shift, max_images=lc.scale_images))
        return self._scale[1]

    def meta(self) -> dict[str, Any]:
        """What loading the autoencoder relies on (latent_brief: the ``autoencoder`` entry;
        ``scale_posterior`` and ``scale_images`` say how the scale was estimated)."""
        c = self.config
        scale, shift = self.latent_scale()
        return {
            "config": c.to_dict(),
            "autoencoder": {
                "network": "autoencoder", "network_config": to_dict(c.network),
                "sample_shape": list(self.source.x.shape[1:]), "data_range": [-1.0, 1.0],
                "scale_factor": scale, "shift_factor": shift,
                "weights_prefix": WEIGHTS_PREFIX,
                "scale_posterior": c.latent.scale_posterior,
                "scale_images": min(c.latent.scale_images, len(self.data.images)),
            },
            "dataset": c.data.dataset,
        }

    def held_out_psnr(self, max_images: int | None = None) -> float:
        """Mean per-image PSNR (dB) of the EMA autoencoder's deterministic reconstructions
        of the test split (the training images when there is none; see ``held_out``)."""
        x = self.test_images[:max_images]
        return float(psnr(x, reconstruct(self.autoencoder, x)).mean())

    def grid_path(self) -> Path:
        """Where this step's reconstruction grid goes: RUN/samples/step_N.png."""
        return self.out_dir / "samples" / f"step_{self.step:08d}.png"

    def reconstruction_grid(self, n: int = 8) -> Path:
        """RUN/samples/step_N.png: ``n`` held-out originals over their reconstructions, the
        PSNR of the first 256 in the caption; also a ``test_psnr`` line in metrics.jsonl."""
        x = self.test_images[:n]
        rec = reconstruct(self.autoencoder, x).clamp(-1, 1)
        value = self.held_out_psnr(256)
        which = "held-out" if self.held_out else "training"
        path = self.grid_path()
        save_labelled_grid(torch.cat([x.cpu(), rec]), path, nrow=len(x),
                           scale=max(1, 64 // x.shape[-1]),
                           row_labels=["original", "reconstruction"],
                           caption=f"step {self.step}: PSNR {value:.2f} dB "
                                   f"({which}, {min(256, len(self.test_images))} images)")
        append_text(self.out_dir / "metrics.jsonl",
                    json.dumps({"step": self.step, "test_psnr": value}) + "\n")
        return path
