"""Sampling throughput: difflab's DDIM vs diffusers' ``DDIMPipeline``, 50 steps each.

Both sample from the same architecture (the ``train_throughput`` configurations, built by
each library) with the same batch, timed interleaved in one process; medians and the
ratio are printed as a markdown table.

    python benchmarks/sample_throughput.py                 # CPU, 32 px, 16 images
    python benchmarks/sample_throughput.py --device cuda --config cifar --n 256 --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from train_throughput import CONFIGS, diffusers_model, sync

from difflab.networks import UNet, UNetConfig
from difflab.parameterization import Denoiser
from difflab.process import make_process
from difflab.samplers import ddim
from difflab.samplers.generate import generate


def difflab_sampler(arch: dict, args: argparse.Namespace):
    """A function drawing ``args.n`` images with difflab's DDIM (one RNG per seed)."""
    net = UNet(UNetConfig(in_channels=3, image_size=args.size, **arch)).to(args.device).eval()
    net = net.to(memory_format=torch.channels_last)  # as Pipeline.from_pretrained does
    den = Denoiser(net, make_process("linear", T=1000), "eps")
    seeds = list(range(args.n))

    @torch.no_grad()
    def draw() -> None:
        generate(den, ddim, (3, args.size, args.size), seeds, steps=50, batch_size=args.n,
                 device=args.device, progress=False, spacing="leading")
    return draw, sum(p.numel() for p in net.parameters())


def diffusers_sampler(arch: dict, args: argparse.Namespace):
    """A function drawing ``args.n`` images with diffusers' DDIMPipeline."""
    from diffusers import DDIMPipeline, DDIMScheduler

    unet = diffusers_model(arch, args.size).to(args.device).eval()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def draw() -> None:
        g = torch.Generator(device=args.device).manual_seed(0)
        pipe(batch_size=args.n, generator=g, num_inference_steps=50, eta=0.0,
             output_type="np")
    return draw, sum(p.numel() for p in unet.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=16, help="images per run (one batch)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = CONFIGS[args.config]
    cases = {"difflab": difflab_sampler(arch, args), "diffusers": diffusers_sampler(arch, args)}
    dev = torch.device(args.device)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16"
           else contextlib.nullcontext())
    times: dict[str, list[float]] = {k: [] for k in cases}
    with amp:
        for draw, _ in cases.values():  # warm-up
            draw()
        for _ in range(args.repeats):
            for name, (draw, _) in cases.items():
                sync(args.device)
                t0 = time.perf_counter()
                draw()
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"# DDIM-50, {name}, {torch.get_num_threads()} threads, config {args.config}, "
          f"{args.size} px, {args.n} images per run, {args.precision}")
    print("| sampler | params | s/run (min-max) | images/s | vs diffusers |\n|---|---|---|---|---|")
    ref = statistics.median(times["diffusers"])
    for k, (_, nparams) in cases.items():
        med = statistics.median(times[k])
        print(f"| {k} | {nparams / 1e6:.2f}M | {med:.2f} ({min(times[k]):.2f}-"
              f"{max(times[k]):.2f}) | {args.n / med:.1f} | {ref / med:.2f}x |")


if __name__ == "__main__":
    main()
