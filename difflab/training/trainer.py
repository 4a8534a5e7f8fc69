"""The training loop: AdamW, gradient clipping, EMA, label dropout, logging, checkpoints, resume.

Reproducibility: the network is initialised from ``seed``; the batch order is a stateless
function of (seed, step) (one permutation per epoch); the noise, times and label dropout come
from one ``torch.Generator`` whose state is saved in every checkpoint together with PyTorch's
global RNG (used by dropout layers). A run resumed at step k therefore continues exactly as if
it had not stopped (bitwise on CPU in fp32).

Speed: the step runs under autocast at ``precision`` (with loss scaling for fp16), on
channels-last images and weights, optionally through ``torch.compile`` and with gradient
checkpointing; it never waits for the device except when a metric line is logged.

Scale: under ``torchrun`` the network is wrapped in DDP. Every rank draws the same global
batch positions, times and noise and trains on its own contiguous slice, so the all-reduced
gradient is that of the single-process global batch; only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import (
    CaptionedImageData,
    ImageData,
    load_dataset,
    sample_toy,
    save_grid,
    save_scatter,
)
from ..networks import MLPConfig, UNetConfig, build_network
from ..objectives import Objective, ObjectiveConfig, build_objective
from ..parameterization import ClippedDenoiser, Denoiser
from ..process import make_process
from ..samplers import ddim
from ..samplers.generate import generate
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    prune_checkpoints,
    save_checkpoint,
    sub_dict,
    write_json,
)
from .config import TrainConfig
from .distributed import (
    check_divisible,
    init_distributed,
    local_slice,
    mean_over_ranks,
)
from .ema import EMA
from .memory import reuse_freed_memory
from .precision import autocast, check_precision, grad_scaler
from .text import CaptionTable

TOY_PREFIX = "toy:"


def objective_from_config(c: TrainConfig) -> Objective:
    """The training objective named by a config (checks the names)."""
    return build_objective(ObjectiveConfig(
        name=c.objective, weighting=c.weighting, min_snr_gamma=c.min_snr_gamma,
        loss_space=c.loss_space, vlb_lambda=c.vlb_lambda, time_sampling=c.time_sampling))


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; no checkpoint is written for that step."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_label_checks(net: torch.nn.Module, on: bool) -> None:
    """Turn a network's per-call label range check (a host sync) on or off, if it has one."""
    if hasattr(net, "check_labels"):
        net.check_labels = on


class Trainer:
    """Owns the model, EMA, optimizer, data and RNG of one run; ``run()`` trains it."""

    def __init__(self, config: TrainConfig, data: ImageData | None = None):
        self.config = c = config
        self.dist, self.device = init_distributed(pick_device(c.device))
        check_precision(c.precision, self.device)
        check_divisible(c.batch_size, self.dist)
        self.is_toy = data is None and c.dataset.startswith(TOY_PREFIX)
        if self.is_toy:  # 2-D points [N, 2], unlabelled
            g = torch.Generator().manual_seed(c.seed)
            points = sample_toy(c.dataset[len(TOY_PREFIX):], c.toy_points, g)
            self.data = ImageData(points[:, :, None, None])  # container only: [N, 2, 1, 1]
            self.images = points.to(self.device)
        else:
            self.data = data if data is not None else load_dataset(c.dataset, c.resolution,
                                                                   c.channels)
            self.images = self.data.images.to(self.device)
        self.labels = None
        if c.class_conditional and self.data.labels is not None:
            self.labels = self.data.labels.to(self.device)
        self.num_classes = self.data.num_classes if self.labels is not None else None
        # captioned data: labels index captions, encoded once; null label = empty prompt
        self.captions: CaptionTable | None = None
        self.text_encoder = None
        if self.labels is not None and isinstance(self.data, CaptionedImageData):
            from ..text import TextEncoder  # optional extra: imported only when needed
            self.text_encoder = TextEncoder(c.text_encoder)
            self.captions = CaptionTable(self.text_encoder, self.data.class_names, self.device)
        self.objective = objective_from_config(c)
        torch.manual_seed(c.seed)
        self.net_name, self.net_config = self._network_config()
        self.net = self._build_net()
        self.process = make_process(c.schedule, zero_terminal_snr=c.zero_terminal_snr, T=c.T)
        self.objective.check(self.process, c.prediction)
        if self.objective.times == "importance" and self.dist.enabled:
            raise ValueError("importance sampling of t keeps a per-process loss history; "
                             "it is not supported under torchrun")
        self.time_sampler = self.objective.time_sampler(self.process)
        self.denoiser = self._denoiser(self.net)
        self.ema = EMA(self.net, c.ema_decay)
        # The EMA samples like a loaded checkpoint (cli.loading.load_denoiser): channels-last
        # weights, user labels checked.
        self.ema.model.to(memory_format=torch.channels_last)
        set_label_checks(self.ema.model, True)
        # fused: one kernel for all parameters, the same AdamW update (on the CPU foreach
        # falls back to per-tensor ops; benchmarks/README.md)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=c.lr,
                                     weight_decay=c.weight_decay, fused=True)
        self.scaler = grad_scaler(c.precision, self.device)
        self._train_denoiser = self._denoiser(self._step_module())
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels
        elif c.reuse_cpu_memory:
            reuse_freed_memory()  # no page faults on the step's activations (memory.py)
        self.generator = torch.Generator(device=self.device).manual_seed(c.seed)
        self._seed_dropout(0)
        self._perms: dict[int, torch.Tensor] = {}
        self.step = 0
        self.out_dir = Path(c.out_dir)

    def _build_net(self) -> torch.nn.Module:
        """The network on the device; channels-last for images, label checks off (the data
        set's labels are valid by construction, and checking them would sync every step)."""
        c = self.config
        net = build_network(self.net_name, asdict(self.net_config)).to(self.device)
        if self.images.ndim == 4 and c.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if hasattr(net, "grad_checkpointing"):
            net.grad_checkpointing = c.grad_checkpointing
        set_label_checks(net, False)
        return net

    def _denoiser(self, net: torch.nn.Module) -> Denoiser:
        c = self.config
        return Denoiser(net, self.process, c.prediction, self.objective.learned_variance,
                        c.sigma_data)

    def _step_module(self) -> torch.nn.Module:
        """What the training step calls: the network, wrapped in DDP and/or compiled."""
        module: torch.nn.Module = self.net
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=ids, gradient_as_bucket_view=True)
        if self.config.compile:
            module = torch.compile(module, mode=self.config.compile_mode)
        return module

    def release_distributed(self) -> None:
        """Drop the DDP wrapper (it holds the process group) once training is over, so the
        group can be destroyed cleanly; the trainer can still save and sample."""
        if self.dist.enabled:
            self._train_denoiser = self.denoiser

    def _seed_dropout(self, step: int) -> None:
        """Give ranks > 0 their own global RNG stream (dropout masks); rank 0 keeps the
        single-process stream."""
        if self.dist.rank > 0:
            torch.manual_seed((self.config.seed * 1_000_003 + step) * 1009 + self.dist.rank)

    def _network_config(self) -> tuple[str, Any]:
        """("mlp", MLPConfig) for 2-D points, ("unet", UNetConfig) for images."""
        c = self.config
        if self.images.ndim == 2:
            if self.objective.learned_variance:
                raise ValueError(f"objective {self.objective.name!r} (learned variance) needs "
                                 "image data and a U-Net")
            return "mlp", MLPConfig(dim=self.images.shape[1], hidden=c.base_channels or 256,
                                    num_classes=self.num_classes)
        # learned variance: the second half of the output channels is v (Nichol & Dhariwal)
        out = 2 * self.images.shape[1] if self.objective.learned_variance else None
        if self.captions is not None:
            return "unet", UNetConfig(in_channels=self.images.shape[1], out_channels=out,
                                      context_dim=self.captions.dim, **c.model_config())
        return "unet", UNetConfig(in_channels=self.images.shape[1], out_channels=out,
                                  num_classes=self.num_classes, **c.model_config())

    # -- data ---------------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of the batch at ``step``: positions step*B .. step*B+B-1 of the epoch-wise
        shuffled stream (permutation of epoch e seeded by (seed, e)). Computed on the device
        from per-epoch permutations copied there once, so a step never copies from host."""
        n, b = len(self.images), self.config.batch_size
        first, last = step * b // n, ((step + 1) * b - 1) // n
        pos = torch.arange(step * b, (step + 1) * b, device=self.device)
        out = self._epoch_perm(first)[pos % n]
        for epoch in range(first + 1, last + 1):  # a batch that spans epoch boundaries
            out = torch.where(pos // n == epoch, self._epoch_perm(epoch)[pos % n], out)
        return out

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        """The permutation of ``epoch`` (seeded by (seed, epoch)) on the device; cached."""
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.images), generator=g)
            if self.device.type == "cuda":
                perm = perm.pin_memory()
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm.to(self.device, non_blocking=True)
        return self._perms[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                         torch.Tensor, torch.Tensor | None]:
        """This rank's slice of the global batch at ``step``: (x0, labels, t, noise, importance
        weights of t or None).

        Label dropout, times and noise are drawn for the whole global batch (in that order,
        from the one generator) and sliced, so they do not depend on the number of ranks."""
        c, g, dev = self.config, self.generator, self.device
        idx = self.batch_indices(step)
        b, sl = len(idx), local_slice(len(idx), self.dist)
        idx = idx[sl]
        x = self.images[idx]
        y = None
        if self.labels is not None:
            drop = torch.rand(b, generator=g, device=dev)[sl]
            y = torch.where(drop < c.p_uncond, self.num_classes, self.labels[idx])
        t, w = self.objective.sample_t(self.process, b, g, dev, self.time_sampler)
        t, w = t[sl], None if w is None else w[sl]
        noise = torch.randn((b, *x.shape[1:]), generator=g, dtype=x.dtype, device=dev)[sl]
        if x.ndim == 4 and c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        return x, y, t, noise, w

    # -- one step ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        w = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / w) if w > 0 else self.config.lr

    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the (detached) mean loss without syncing."""
        c = self.config
        self.net.train()
        x, y, t, noise, w = self.batch(self.step)
        cond = self.captions(y) if self.captions is not None else y
        with autocast(c.precision, self.device):
            out = self.objective.loss(self._train_denoiser, x, cond, t, noise, w)
            loss = out.loss.mean()
        if self.time_sampler is not None:  # a host sync: importance sampling only
            self.time_sampler.update(t, out.vlb_term)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if c.grad_clip > 0:  # returns the norm as a tensor: no sync
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), c.grad_clip, foreach=True)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.scaler.step(self.opt)  # fp16 only: checks for inf gradients (a sync)
        self.scaler.update()
        self.ema.update(self.net)
        self.step += 1
        return loss.detach()

    # -- checkpoints ----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {
            "difflab_version": __version__,
            "config": self.config.to_dict(),
            "network": {"name": self.net_name, "config": asdict(self.net_config)},
            "process": self.process.to_config(),
            "prediction": self.config.prediction,
            "learned_variance": self.objective.learned_variance,
            "sigma_data": self.config.sigma_data,
            "data_range": None if self.is_toy else [-1.0, 1.0],
            "class_names": (list(self.data.class_names)
                            if self.num_classes and self.captions is None else []),
            **({"text_encoder": self.config.text_encoder, "captions": self.data.class_names}
               if self.captions is not None else {}),
            "ema_updates": self.ema.updates,
        }

    def save(self) -> Path:
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        opt_tensors, opt_meta = optimizer_tensors(self.opt)
        tensors |= opt_tensors
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.time_sampler is not None:
            tensors |= {f"importance.{k}": v for k, v in self.time_sampler.state_dict().items()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        folder = self.out_dir / "checkpoints"
        path = save_checkpoint(folder, self.step, tensors, {**self.meta(), "optimizer": opt_meta})
        prune_checkpoints(folder, self.config.keep_checkpoints)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore weights, EMA, optimizer, RNG states and step from a checkpoint."""
        tensors, meta = load_checkpoint(path)
        self.net.load_state_dict(sub_dict(tensors, "model"))
        self.ema.load_state_dict(sub_dict(tensors, "ema"), meta["ema_updates"])
        load_optimizer(self.opt, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng.generator"].to("cpu"))
        torch.set_rng_state(tensors["rng.torch"])
        if self.time_sampler is not None:
            self.time_sampler.load_state_dict(sub_dict(tensors, "importance"))
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(meta["step"])
        self._seed_dropout(self.step)

    def latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.out_dir / "checkpoints")
        return found[-1] if found else None

    # -- samples ----------------------------------------------------------------------------
    def sample_grid(self, per_class: int = 10, seed: int = 0) -> Path:
        """DDIM samples from the EMA model: one row per class (or a square grid); for 2-D
        data a scatter plot of 2000 points."""
        k = self.num_classes or 1
        n = 2000 if self.is_toy else per_class * k
        labels = torch.arange(k).repeat_interleave(per_class) if self.num_classes else None
        if self.captions is not None:  # the first 8 captions, one row each
            k = min(8, self.num_classes or 1)
            n, labels = per_class * k, self.captions(
                torch.arange(k, device=self.device).repeat_interleave(per_class))
        den = self._denoiser(self.ema.model)
        x = generate(den if self.is_toy else ClippedDenoiser(den), ddim, self.images.shape[1:],
                     list(range(seed, seed + n)), labels=labels,
                     steps=self.config.sample_steps, device=self.device, progress=False)
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        if self.is_toy:
            return save_scatter(x, path)
        return save_grid(x, path, nrow=per_class, scale=max(1, 64 // self.config.resolution))

    # -- the loop -----------------------------------------------------------------------------
    def run(self, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
        """Train until ``steps`` (default: config.steps) total steps; returns a summary.

        Under torchrun every rank runs this; only rank 0 writes files or shows progress."""
        c, main = self.config, self.dist.is_main
        total = c.steps if steps is None else steps
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / "config.json", self.meta())
        log_path = self.out_dir / "metrics.jsonl"
        bar = tqdm(total=total, initial=self.step, desc="training", unit="step",
                   disable=not (progress and main))
        losses, t0, images, last = [], time.perf_counter(), 0, {}
        while self.step < total:
            losses.append(self.train_step())
            images += c.batch_size
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == total:
                last = self._log(log_path, losses, images, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}")
                losses, t0, images = [], time.perf_counter(), 0
            if main and c.sample_every > 0 and self.step % c.sample_every == 0:
                self.sample_grid()
            if main and c.checkpoint_every > 0 and self.step % c.checkpoint_every == 0:
                self.save()
        bar.close()
        ckpt = self.out_dir / "checkpoints" / f"step_{self.step:08d}.json"
        if main and not ckpt.exists():
            ckpt = self.save()
        return {"step": self.step, "checkpoint": str(ckpt), "metrics": str(log_path), **last}

    def _log(self, path: Path, losses: list[torch.Tensor], images: int,
             seconds: float) -> dict[str, Any]:
        # the only host sync, once per interval (and the only collective outside DDP)
        loss = float(mean_over_ranks(torch.stack(losses).mean(), self.dist))
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss} by step {self.step}; not saving this state. Last good "
                f"checkpoint: {self.latest_checkpoint()}. Try a lower --lr or --grad-clip.")
        row = {"step": self.step, "loss": loss, "lr": self.lr_at(self.step - 1),
               "images_per_s": images / max(seconds, 1e-9), "time": time.time()}
        if self.dist.is_main:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row
