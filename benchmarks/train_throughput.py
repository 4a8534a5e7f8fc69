"""Training throughput: difflab's training step vs diffusers' ``UNet2DModel``.

Both networks are built to the same architecture (widths, depth, attention resolutions,
dropout, scale-shift time conditioning; parameter counts printed) and trained with the same
step: DDPM noise at t ~ U{1..T}, MSE on eps, AdamW, gradient clipping at 1, EMA. Each
network trains in its own process, as it would for a user: a process's memory allocator
state is shared by everything in it, and with both steps in one process each one's
allocation pattern changes the other's page faults. The processes take turns (A, B, B, A,
...), each timing ``--steps`` steps per turn, and the medians over all timed steps are
compared, so slow drifts of a shared machine hit both alike.

    python benchmarks/train_throughput.py                      # CPU, 32 and 64 px, batch 32
    python benchmarks/train_throughput.py --device cuda --config cifar --precision bf16 \\
        --compile --sizes 32 --batch 128
    python benchmarks/train_throughput.py --threads 1 --clock cpu --precision bf16 \\
        --diffusers-default        # difflab bf16 vs diffusers' default (eager fp32) step

By default both networks get the same options (like for like). ``--diffusers-default`` runs
diffusers as its train_unconditional example does (eager, fp32) whatever difflab's
``--precision``/``--compile``; ``--ablate-fused`` adds, interleaved with the others, difflab's
step with the plain PyTorch ops instead of its fused CPU GroupNorm/SiLU/dropout nodes;
``--ablate-native`` adds difflab with its fused nodes on PyTorch ops instead of the native
kernels (``DIFFLAB_NATIVE=0``, :mod:`difflab.networks.native`); ``--ablate-memory`` adds
difflab with glibc's default malloc thresholds and diffusers with difflab's
(``difflab.training.memory.reuse_freed_memory``).

On CUDA the table also gives model FLOPs utilisation: FLOPs of one training step (forward
and backward, counted by ``torch.utils.flop_counter.FlopCounterMode``) times steps per
second, over ``--peak-tflops`` (default 989, the H100 SXM dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.data import ImageData
from difflab.networks import native, unet
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.training.memory import reuse_freed_memory

#: Architectures: CIFAR-10 DDPM (35.7M parameters) and a narrower one for CPU timings.
CONFIGS = {
    "cifar": dict(base_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                  attention_resolutions=[16], dropout=0.1, num_heads=4,
                  time_conditioning="add"),
    "cpu": dict(base_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                attention_resolutions=[16], dropout=0.1, num_heads=1),
    # a smoke test of the script itself (tests/test_benchmarks.py), at 8x8
    "tiny": dict(base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[4], dropout=0.1, num_heads=1),
}


@dataclass
class Case:
    """One timed training step and its network's parameter count."""

    name: str
    step: Callable[[], None]
    params: int


def difflab_case(arch: dict, size: int, batch: int, args: argparse.Namespace,
                 reuse_memory: bool = True) -> Case:
    """difflab's own training step (DiffusionRecipe.train_step) on random images (unconditional)."""
    n = max(4 * batch, 256)
    data = ImageData(torch.rand(n, 3, size, size) * 2 - 1)
    cfg = TrainConfig.from_values(dict(
                      dataset="bench", resolution=size, channels=3, batch_size=batch, lr=1e-4,
                      warmup_steps=0, grad_clip=1.0, ema_decay=0.9999,
                      schedule="linear", device=args.device, precision=args.precision,
                      compile=args.compile, compile_mode=args.compile_mode,
                      channels_last=not args.no_channels_last,
                      reuse_cpu_memory=reuse_memory, out_dir="/tmp/difflab-bench", **arch))
    tr = DiffusionRecipe(cfg, data=data)
    nparams = sum(p.numel() for p in tr.net.parameters())
    return Case(f"difflab{_label(args.precision, args.compile)}", lambda: tr.train_step(),
                nparams)


def _label(precision: str, compiled: bool) -> str:
    """Row label suffix: `` (bf16, compiled)`` etc.; empty for eager fp32."""
    opts = [o for o in (precision if precision != "fp32" else "", compiled and "compiled") if o]
    return f" ({', '.join(opts)})" if opts else ""


def unfused(case: Case) -> Case:
    """``case`` with the ResBlocks on the plain PyTorch ops (fused node off) while it steps."""
    def step() -> None:
        fused = unet.use_fused  # looked up by the ResBlocks at call time
        unet.use_fused = lambda h: False
        try:
            case.step()
        finally:
            unet.use_fused = fused

    return Case(f"{case.name} (plain ops)", step, case.params)


def diffusers_model(arch: dict, size: int) -> torch.nn.Module:
    """``UNet2DModel`` with difflab's architecture: attention where the feature map is in
    ``attention_resolutions``, scale-shift conditioning, the same head width."""
    from diffusers import UNet2DModel

    mult, base = arch["channel_mult"], arch["base_channels"]
    res = [size // 2**i for i in range(len(mult))]
    attn = [r in arch["attention_resolutions"] for r in res]
    head_dim = base * mult[-1] // arch["num_heads"]
    return UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3,
        layers_per_block=arch["num_res_blocks"],
        block_out_channels=tuple(base * m for m in mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dim, norm_num_groups=32, dropout=arch["dropout"],
        add_attention=True,
        resnet_time_scale_shift="default" if arch.get("time_conditioning") == "add"
        else "scale_shift")


def diffusers_case(arch: dict, size: int, batch: int, args: argparse.Namespace) -> Case:
    """The textbook diffusers training step (as in its train_unconditional example)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    dev = torch.device(args.device)
    model = diffusers_model(arch, size).to(dev).train()
    precision, compiled = args.precision, args.compile
    if args.diffusers_default:
        precision, compiled = "fp32", False
    if compiled:
        model = torch.compile(model, mode=args.compile_mode)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    ema = EMAModel(model.parameters(), decay=0.9999, foreach=True)
    images = torch.rand(max(4 * batch, 256), 3, size, size, device=dev) * 2 - 1
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    g = torch.Generator(device=dev).manual_seed(0)
    state = {"k": 0}

    def step() -> None:
        k0 = state["k"] * batch
        state["k"] += 1
        x0 = images[torch.arange(k0, k0 + batch, device=dev) % len(images)]  # no host copy
        noise = torch.randn(x0.shape, generator=g, device=dev)
        t = torch.randint(0, 1000, (batch,), generator=g, device=dev)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = model(sched.add_noise(x0, noise, t), t).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.step(model.parameters())

    return Case(f"diffusers{_label(precision, compiled)}", step,
                sum(p.numel() for p in model.parameters()))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_case(name: str, size: int, args: argparse.Namespace) -> Case:
    """The case called ``name`` (see :func:`case_names`) at this resolution."""
    arch = CONFIGS[args.config]
    if name == "difflab":
        return difflab_case(arch, size, args.batch, args)
    if name == "difflab-plain":
        return unfused(difflab_case(arch, size, args.batch, args))
    if name == "difflab-ops":
        os.environ["DIFFLAB_NATIVE"] = "0"  # this worker process only
        case = difflab_case(arch, size, args.batch, args)
        return Case(f"{case.name} (fused, no native kernels)", case.step, case.params)
    if name == "difflab-glibc":
        case = difflab_case(arch, size, args.batch, args, reuse_memory=False)
        return Case(f"{case.name} (glibc defaults)", case.step, case.params)
    if name == "diffusers":
        return diffusers_case(arch, size, args.batch, args)
    if name == "diffusers-reuse":
        reuse_freed_memory()
        case = diffusers_case(arch, size, args.batch, args)
        return Case(f"{case.name} (reused memory)", case.step, case.params)
    raise ValueError(f"unknown case {name!r}")


def case_names(args: argparse.Namespace) -> list[str]:
    names = ["difflab"]
    if args.ablate_native:
        names.append("difflab-ops")
    if args.ablate_fused:
        names.append("difflab-plain")
    if args.ablate_memory:
        names.append("difflab-glibc")
    if not args.no_diffusers:
        names.append("diffusers")
        if args.ablate_memory:
            names.append("diffusers-reuse")
    return names


def worker(args: argparse.Namespace) -> None:
    """One case in its own process: build, warm up, then time ``run N`` requests from stdin
    and answer each with a JSON list of seconds per step."""
    try:
        case = build_case(args.worker, args.sizes[0], args)
    except ImportError as e:  # e.g. a GPU machine without diffusers
        print(json.dumps({"error": str(e)}), flush=True)
        return
    for _ in range(args.warmup):  # compilation, allocator, oneDNN primitive caches
        case.step()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(json.dumps({"name": case.name, "params": case.params}), flush=True)
    for line in sys.stdin:
        if not line.startswith("run "):
            break
        times = []
        for _ in range(int(line.split()[1])):
            sync(args.device)
            t0 = clock()
            case.step()
            sync(args.device)
            times.append(clock() - t0)
        print(json.dumps(times), flush=True)


class Worker:
    """A case running in a child process (``--worker NAME``), driven over pipes."""

    def __init__(self, name: str, size: int, argv: list[str]) -> None:
        cmd = [sys.executable, __file__, *argv, "--worker", name, "--sizes", str(size)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.proc.args} exited early")
        return json.loads(line)

    def run(self, steps: int) -> list[float]:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def time_interleaved(workers: list[Worker], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each worker: ``repeats`` rounds of ``steps`` steps, interleaved
    (A, B, B, A, ...: the order alternates), so slow drifts of the machine hit all alike."""
    times: dict[str, list[float]] = {w.info["name"]: [] for w in workers}
    for r in range(repeats):
        for w in workers if r % 2 == 0 else workers[::-1]:
            times[w.info["name"]].extend(w.run(steps))
    return times


def step_flops(arch: dict, size: int, batch: int, args: argparse.Namespace) -> float:
    """FLOPs of one forward+backward of difflab's network at this batch (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from difflab.networks import UNet, UNetConfig

    net = UNet(UNetConfig(in_channels=3, image_size=size, **arch)).to(args.device)
    x = torch.randn(batch, 3, size, size, device=args.device)
    t = torch.rand(batch, device=args.device) * 1000
    with FlopCounterMode(display=False) as counter:
        net(x, t).square().mean().backward()
    return float(counter.get_total_flops())


def run_size(size: int, args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Benchmark one resolution, each case in its own process; returns markdown rows."""
    workers = []
    for name in case_names(args):
        w = Worker(name, size, argv)
        if "error" in w.info:
            print(f"{name} unavailable ({w.info['error']}); skipped")
            w.close()
        else:
            workers.append(w)
    try:
        times = time_interleaved(workers, args.steps, args.repeats)
    finally:
        for w in workers:
            w.close()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = next((med[n] for n in med if n.startswith("diffusers")), None)
    flops = step_flops(CONFIGS[args.config], size, args.batch, args) \
        if args.device.startswith("cuda") else 0
    rows = []
    for w in workers:
        name = w.info["name"]
        ips = args.batch / med[name]
        ratio = f"{base / med[name]:.2f}x" if base else "-"
        mfu = f"{100 * flops / med[name] / (args.peak_tflops * 1e12):.1f}%" if flops else "-"
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        rows.append(f"| {name} | {size} | {args.batch} | {w.info['params'] / 1e6:.2f}M | "
                    f"{med[name] * 1e3:.1f} ({spread}) | {ips:.1f} | {ratio} | {mfu} |")
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--no-channels-last", action="store_true", help="difflab in NCHW")
    p.add_argument("--no-diffusers", action="store_true", help="time difflab alone")
    p.add_argument("--diffusers-default", action="store_true",
                   help="diffusers eager fp32 (its example's default) whatever --precision "
                        "and --compile say")
    p.add_argument("--ablate-fused", action="store_true",
                   help="also time difflab with the plain PyTorch ops instead of its fused "
                        "CPU GroupNorm/SiLU/dropout node")
    p.add_argument("--ablate-native", action="store_true",
                   help="also time difflab's fused nodes on PyTorch ops instead of the "
                        "native CPU kernels")
    p.add_argument("--ablate-memory", action="store_true",
                   help="also time difflab with glibc's default malloc thresholds and "
                        "diffusers with difflab's (reuse_freed_memory)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per network")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall seconds, or this process's CPU seconds (for a busy shared CPU; "
                        "with --threads 1 it is the work of a step)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the device for MFU (H100 SXM: 989)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker:
        worker(args)
        return
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, config "
          f"{args.config}, {args.precision}{', compiled' if args.compile else ''}, "
          f"{args.clock} clock, one process per network, native CPU kernels "
          f"{'on' if native.library() is not None else 'off'}")
    print("| network | px | batch | params | ms/step (min-max) | images/s | vs diffusers "
          "| MFU |\n|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        print("\n".join(run_size(size, args, sys.argv[1:])), flush=True)


if __name__ == "__main__":
    main()
