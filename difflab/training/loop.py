"""The one training loop: it receives ready-made pieces and owns only the loop.

A recipe (``difflab.recipes``) builds a module to train, a :class:`BatchSource` and a loss
function, and hands them to :class:`TrainLoop`. The loop owns what every run shares: AdamW
with linear warm-up, gradient clipping, an optional EMA of the weights, autocast and loss
scaling, ``torch.compile``, DDP under ``torchrun``, metrics.jsonl (and the sinks of
``sinks.py``, e.g. TensorBoard), the non-finite check, periodic callbacks (sample grids),
checkpoints with bitwise resume, and the run folder
(``run_folder``: stale temporary files removed, another run in it refused unless
``overwrite``). It knows nothing of networks, data sets, labels or text.

Non-finite values are never saved: every step's detached loss is kept on the device (no host
sync) until the next metric line or checkpoint, where one reduction over them is read back;
a checkpoint is written only if all of those losses and every tensor it holds are finite.

Reproducibility: everything random that a step draws (batch positions of a with-replacement
source, times, noise, label dropout) comes from one ``torch.Generator`` seeded by ``seed``,
whose state is saved in every checkpoint together with PyTorch's global RNG (dropout
layers). A run resumed at step k therefore continues exactly as if it had not stopped
(bitwise on the CPU in fp32).

Scale: under ``torchrun`` the module is wrapped in DDP. Every rank draws the same global
batch and randomness; the loss function trains on ``ctx.local``, this rank's contiguous
slice, so the all-reduced gradient is that of the single-process global batch. Only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..config import check_ranges, option
from ..io import LoadError, append_text, load_state
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    sub_dict,
    write_json,
)
from .distributed import DistInfo, init_distributed, local_slice, mean_over_ranks
from .ema import EMA
from .memory import reuse_freed_memory
from .precision import autocast, check_precision, grad_scaler
from .run_folder import prepare_run_folder, run_lock
from .sinks import MetricsSink, check_log, make_sinks

__all__ = ["BatchSource", "LoopConfig", "LossFn", "NonFiniteLossError",
           "StepContext", "TrainLoop", "init_device", "pick_device"]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss (or a tensor about to be checkpointed) becomes NaN or infinite;
    no checkpoint is written from that step on. The message names the last good one."""


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_device(device: str, precision: str = "fp32") -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if any; this rank's device (precision checked)."""
    dist, dev = init_distributed(pick_device(device))
    check_precision(precision, dev)
    return dist, dev


class BatchSource(Protocol):
    """Where the loop's batches come from: the global batch of a step (any sized object;
    the loss function knows what it holds; ``difflab.data.source`` has the data sets' ones).

    A source may be stateless in ``step`` or draw from the run's ``generator`` (which is
    checkpointed); either way a resumed run gets the same batches.
    """

    def batch(self, step: int, generator: torch.Generator) -> Sized: ...


@dataclass(frozen=True)
class StepContext:
    """What a loss function may use besides the module and the batch."""

    step: int
    generator: torch.Generator   # the run's one generator: draw for the *global* batch
    local: slice                 # this rank's share of the global batch
    device: torch.device


#: ``loss(module, batch, ctx) -> loss`` ([B_local] per example or a scalar); runs under
#: autocast; ``module`` is the (possibly DDP-wrapped, compiled) module being trained.
LossFn = Callable[[nn.Module, Any, StepContext], Tensor]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Tensor]: ...
    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


@dataclass
class LoopConfig:
    """What the loop itself needs; a recipe fills it from its own typed config."""

    steps: int = option(1500, "total optimisation steps", resume=True, ge=1)
    lr: float = option(2e-3, "AdamW learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    warmup_steps: int = option(200, "linear learning-rate warm-up steps (0: none)", ge=0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", ge=0)
    ema_decay: float | None = option(0.999, "EMA decay of the weights (None: no EMA)",
                                      ge=0, lt=1)
    fused_adamw: bool = option(True, "AdamW as one kernel for all parameters (the same "
                                     "update rule; False: PyTorch's per-tensor default)")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "autocast precision",
                                                        resume=True)
    compile: bool = option(False, "torch.compile the module for the step", resume=True)
    compile_mode: str = option("default", "torch.compile mode", resume=True)
    reuse_cpu_memory: bool = option(True, "CPU: keep freed memory in the process",
                                    resume=True)
    log_every: int = option(50, "steps between metric lines", resume=True, ge=1)
    log: Literal["jsonl", "tensorboard"] = option(
        "jsonl", "metric lines: jsonl (metrics.jsonl) or tensorboard (also TensorBoard "
        "scalars in RUN/tensorboard; sinks.py)", resume=True)
    sample_every: int = option(500, "steps between callbacks (0: never)", resume=True, ge=0)
    checkpoint_every: int = option(500, "steps between checkpoints (0: only at the end)",
                                   resume=True, ge=0)
    keep_checkpoints: int = option(2, "recent checkpoints kept (0: all)", resume=True, ge=0)
    out_dir: str = option("runs/run", "run folder", resume=True)
    seed: int = option(0, "seed of the run's generator (and of ranks' dropout streams)")
    progress_desc: str = option("training", "label of the progress bar", resume=True)
    overwrite: bool = option(False, "start afresh in a run folder that holds another run, "
                                    "deleting its files (run_folder.py); False: refuse",
                             resume=True)

    def __post_init__(self) -> None:
        check_ranges(self)  # the same range checks when built directly as from a file


@dataclass
class TrainLoop:
    """Trains ``model`` on ``loss(model, source.batch(step), ctx)``; see the module docstring.

    Args:
        config: the loop's settings.
        model: the module to train, already on ``device`` and seeded by the recipe.
        source: the batch source.
        loss: the loss function (see :data:`LossFn`).
        meta: JSON-able description of the run written into every checkpoint and
            ``config.json`` (the loop adds version, EMA count, optimizer and step).
        dist, device: from :func:`init_device`.
        callbacks: ``fn(loop)`` called on rank 0 every ``config.sample_every`` steps.
        state: extra checkpointed state, ``prefix -> object with state_dict()`` (e.g. an
            importance sampler of times), saved as ``prefix.*`` tensors.
    """

    config: LoopConfig
    model: nn.Module
    source: BatchSource
    loss: LossFn
    meta: Callable[[], dict[str, Any]]
    dist: DistInfo
    device: torch.device
    callbacks: Sequence[Callable[[TrainLoop], Any]] = ()
    state: Mapping[str, Stateful] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.config
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay is not None else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr,
                                     weight_decay=c.weight_decay,
                                     **({"fused": True} if c.fused_adamw else {}))
        self.scaler = grad_scaler(c.precision, self.device)
        self.train_module = self._step_module()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels
        elif c.reuse_cpu_memory:
            reuse_freed_memory()  # no page faults on the step's activations (memory.py)
        self.generator = torch.Generator(device=self.device).manual_seed(c.seed)
        self._seed_dropout(0)
        self.step = 0
        self.out_dir = Path(c.out_dir)
        self.resumed_from: Path | None = None
        self._folder_ready = False  # prepare_run_folder ran (at the first run())
        check_log(c.log)  # a missing optional package fails here, before any training
        self._sinks: list[MetricsSink] = []

    def _step_module(self) -> nn.Module:
        """What the step calls: the model, wrapped in DDP and/or compiled."""
        module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                         gradient_as_bucket_view=True)
        if self.config.compile:
            module = torch.compile(module, mode=self.config.compile_mode)
        return module

    def release_distributed(self) -> None:
        """Drop the DDP wrapper (it holds the process group) once training is over."""
        if self.dist.enabled:
            self.train_module = self.model

    def _seed_dropout(self, step: int) -> None:
        """Ranks > 0 get their own global RNG stream (dropout masks); rank 0 keeps the
        single-process stream."""
        if self.dist.rank > 0:
            torch.manual_seed((self.config.seed * 1_000_003 + step) * 1009 + self.dist.rank)

    @property
    def folder_ready(self) -> bool:
        """The run folder has been made ready (the first :meth:`run` call): files may be
        written into it."""
        return self._folder_ready

    # -- one step ---------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_steps`` steps, then constant."""
        w, lr = self.config.warmup_steps, self.config.lr
        return lr * min(1.0, (step + 1) / w) if w > 0 else lr

    def context(self, step: int, size: int) -> StepContext:
        return StepContext(step, self.generator, local_slice(size, self.dist), self.device)

    def train_step(self) -> tuple[Tensor, int]:
        """One optimisation step; the detached mean loss (no host sync) and batch size."""
        c = self.config
        self.model.train()
        batch = self.source.batch(self.step, self.generator)
        with autocast(c.precision, self.device):
            loss = self.loss(self.train_module, batch, self.context(self.step, len(batch)))
            loss = loss.mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if c.grad_clip > 0:  # returns the norm as a tensor: no sync
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip, foreach=True)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.scaler.step(self.opt)  # fp16 only: checks for inf gradients (a sync)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return loss.detach(), len(batch)

    # -- checkpoints ---------------------------------------------------------------------------
    def full_meta(self) -> dict[str, Any]:
        """The recipe's meta plus what the loop knows (version, EMA updates)."""
        extra = {"ema_updates": self.ema.updates} if self.ema is not None else {}
        return {"difflab_version": __version__, **self.meta(), **extra}

    def save(self) -> Path:
        """Write a checkpoint of the current step (weights, EMA, optimizer, RNG, state).

        Raises:
            NonFiniteLossError: a tensor to save is not finite (nothing is written).
            difflab.io.WriteError: the file system refused the write (earlier checkpoints
                stay intact)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        opt_tensors, opt_meta = optimizer_tensors(self.opt)
        tensors |= opt_tensors
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        for prefix, obj in self.state.items():
            tensors |= {f"{prefix}.{k}": v for k, v in obj.state_dict().items()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        self._check_tensors(tensors)
        folder = self.out_dir / "checkpoints"
        path = save_checkpoint(folder, self.step, tensors,
                               {**self.full_meta(), "optimizer": opt_meta})
        prune_checkpoints(folder, self.config.keep_checkpoints)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore weights, EMA, optimizer, RNG states, extra state and step.

        Raises:
            LoadError: a file of the checkpoint is cut short or corrupt, its tensors are
                another network's, or it lacks what a training checkpoint holds; the
                message names the file. Nothing is restored unless the weights all fit.
        """
        tensors, meta = load_checkpoint(path)
        self.resumed_from = resolve_checkpoint(path)
        file = self.resumed_from.with_suffix(".safetensors")
        # names and shapes are compared first (load_state): one line instead of PyTorch's
        # one line per tensor, and no half-restored model
        load_state(self.model, sub_dict(tensors, "model"), str(file))
        try:
            if self.ema is not None:
                load_state(self.ema.model, sub_dict(tensors, "ema"), f"{file} (EMA weights)")
                self.ema.updates = int(meta["ema_updates"])
            load_optimizer(self.opt, tensors, meta["optimizer"])
            self.generator.set_state(tensors["rng.generator"].to("cpu"))
            torch.set_rng_state(tensors["rng.torch"])
        except KeyError as e:
            raise LoadError(f"{file.with_suffix('.json')} + .safetensors is not a complete "
                            f"training checkpoint: {e} is missing") from None
        except (ValueError, RuntimeError) as e:  # optimizer groups or RNG states that do not fit
            if isinstance(e, LoadError):
                raise
            raise LoadError(f"{file} does not fit this run: {str(e).splitlines()[0]}") from None
        for prefix, obj in self.state.items():
            obj.load_state_dict(sub_dict(tensors, prefix))
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(meta["step"])
        self._seed_dropout(self.step)

    def latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.out_dir / "checkpoints")
        return found[-1] if found else None

    # -- the loop ------------------------------------------------------------------------------
    def run(self, steps: int | None = None, progress: bool = True,
            save_final: bool = True) -> dict[str, Any]:
        """Train until ``steps`` (default: config.steps) total steps; returns a summary.
        With ``save_final`` the last step is checkpointed (unless it already is).

        Rank 0 holds a lock on the run folder while it trains and, at the first call, makes
        the folder ready (``run_folder.prepare_run_folder``: stale temporary files removed;
        another run there refused unless ``config.overwrite``).

        Under torchrun every rank runs this; only rank 0 writes files or shows progress.

        Raises:
            NonFiniteLossError: a loss or a tensor to save became NaN/Inf (nothing saved).
            RunFolderError: the run folder holds another run, or is in use.
            difflab.io.WriteError: a checkpoint or log could not be written."""
        lock = run_lock(self.out_dir) if self.dist.is_main else contextlib.nullcontext()
        with lock:
            if self.dist.is_main and not self._folder_ready:
                prepare_run_folder(self.out_dir, self.resumed_from, self.config.overwrite)
            self._folder_ready = True
            return self._run(self.config.steps if steps is None else steps, progress,
                             save_final)

    def _run(self, total: int, progress: bool, save_final: bool) -> dict[str, Any]:
        c, main = self.config, self.dist.is_main
        if main:
            write_json(self.out_dir / "config.json", self.full_meta())
        log_path = self.out_dir / "metrics.jsonl"
        bar = tqdm(total=total, initial=self.step, desc=c.progress_desc, unit="step",
                   disable=not (progress and main))
        self._sinks = make_sinks(c.log, self.out_dir) if main else []
        try:
            last = self._steps(total, bar, log_path)
        finally:
            for sink in self._sinks:
                sink.close()
        bar.close()
        ckpt = self.out_dir / "checkpoints" / f"step_{self.step:08d}.json"
        if main and save_final and not ckpt.exists():
            ckpt = self.save()
        return {"step": self.step, "checkpoint": str(ckpt), "metrics": str(log_path), **last}

    def _steps(self, total: int, bar: tqdm, log_path: Path) -> dict[str, Any]:
        """The steps up to ``total``; returns the last metric line."""
        c, main = self.config, self.dist.is_main
        losses: list[Tensor] = []
        t0, items, last = time.perf_counter(), 0, {}
        while self.step < total:
            loss, n = self.train_step()
            losses.append(loss)
            items += n
            bar.update(1)
            save_now = c.checkpoint_every > 0 and self.step % c.checkpoint_every == 0
            if self.step % c.log_every == 0 or self.step == total:
                last = self._log(log_path, losses, items, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}")
                losses, t0, items = [], time.perf_counter(), 0
            elif save_now:  # the steps since the last metric line; every rank takes part
                self._mean_loss(losses)
            if main and c.sample_every > 0 and self.step % c.sample_every == 0:
                for callback in self.callbacks:
                    callback(self)
            if main and save_now:
                self.save()
        return last

    def _mean_loss(self, losses: list[Tensor]) -> float:
        """The mean over ranks and ``losses`` (the last ``len(losses)`` steps), read back in
        one host sync; NonFiniteLossError naming the first bad step if it is not finite (a
        NaN or Inf in any term makes the mean non-finite)."""
        loss = float(mean_over_ranks(torch.stack(losses).mean(), self.dist))
        if not math.isfinite(loss):
            local = torch.stack(losses).float().cpu()
            bad = (~torch.isfinite(local)).nonzero()
            first = self.step - len(losses) + 1 + (int(bad[0]) if len(bad) else 0)
            raise NonFiniteLossError(
                f"loss became {loss} by step {first}; not saving this state. Last good "
                f"checkpoint: {self.latest_checkpoint() or 'none'}. Try a lower --lr or "
                f"--grad-clip.")
        return loss

    def _check_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """NonFiniteLossError if a floating-point tensor to save holds NaN or Inf (a finite
        loss does not imply finite weights: an update can overflow them)."""
        floats = [(k, v) for k, v in tensors.items() if v.is_floating_point()]
        flags = [torch.isfinite(v).all() for _, v in floats]
        devices = {f.device for f in flags}  # one read-back per device (GPU weights, CPU state)
        if all(bool(torch.stack([f for f in flags if f.device == d]).all()) for d in devices):
            return
        name = next(k for k, v in floats if not bool(torch.isfinite(v).all()))
        raise NonFiniteLossError(
            f"{name} became non-finite by step {self.step}; not saving this state. Last good "
            f"checkpoint: {self.latest_checkpoint() or 'none'}. Try a lower --lr or "
            f"--grad-clip.")

    def _log(self, path: Path, losses: list[Tensor], items: int,
             seconds: float) -> dict[str, Any]:
        # a host sync once per interval (and a collective outside DDP); see _mean_loss
        loss = self._mean_loss(losses)
        row = {"step": self.step, "loss": loss, "lr": self.lr_at(self.step - 1),
               "images_per_s": items / max(seconds, 1e-9), "time": time.time()}
        if self.dist.is_main:
            append_text(path, json.dumps(row) + "\n")
            for sink in self._sinks:
                sink.write(row)
        return row
