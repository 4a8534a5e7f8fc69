"""CPU cost of the U-Net's norm chains: PyTorch ops vs difflab's fused node, and why.

The fused node runs on the native kernels (``difflab.networks.native``) or, with them off,
on PyTorch ops; the first table times both.

Forward + backward of ``dropout(silu(GroupNorm(x) * (1 + scale) + shift))`` (the ResBlock's
second norm, time-conditioned) and of ``silu(GroupNorm(x))`` (the first norm, and the output
norm), on channels-last float32 activations of the shapes the ``cpu`` configuration of
train_throughput.py sees at batch 32. A second table times PyTorch's own GroupNorm kernels
on channels-last against contiguous tensors of the same shape, and a third the U-Net's
upsampling (nearest x2 then a 3x3 conv) against its sub-pixel form. Process CPU time, one
thread, median of interleaved repeats (robust on a shared machine), with difflab's
allocator setting (``reuse_freed_memory``) as in training.

    python benchmarks/fused_ops.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks import native
from difflab.networks.fused import group_norm_act
from difflab.networks.upsample import upsample_conv3x3
from difflab.training.memory import reuse_freed_memory

SHAPES = [(32, 32), (64, 16), (64, 8), (64, 4), (128, 8), (128, 16), (32, 64),
          (64, 32)]  # (C, H = W)


def timed(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median CPU milliseconds of each function, run interleaved after one warm-up call."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            ts[k].append(time.process_time() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in ts.items()}


def row(c: int, h: int, batch: int, p: float, repeats: int) -> str:
    x = torch.randn(batch, c, h, h).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    norm = nn.GroupNorm(min(32, c // 2), c)
    scale, shift = (torch.randn(batch, c, 1, 1, requires_grad=True) for _ in range(2))
    g = torch.randn_like(x)

    def without_native(f: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with native.disabled():
                f()
        return run

    def plain_fused() -> None:
        group_norm_act(x, norm).backward(g)

    def cond_fused() -> None:
        group_norm_act(x, norm, scale=scale, shift=shift, dropout=p).backward(g)

    ms = timed({
        "plain": lambda: F.silu(norm(x)).backward(g),
        "plain_ops": without_native(plain_fused),
        "plain_native": plain_fused,
        "cond": lambda: F.dropout(F.silu(norm(x) * (1 + scale) + shift), p, True).backward(g),
        "cond_ops": without_native(cond_fused),
        "cond_native": cond_fused,
    }, repeats)
    cells = [ms[k] for k in ("plain", "plain_ops", "plain_native", "cond", "cond_ops",
                             "cond_native")]
    return (f"| {batch}x{c}x{h}x{h} | " + " | ".join(f"{v:.2f}" for v in cells)
            + f" | {ms['plain'] / ms['plain_native']:.2f}x"
            f" | {ms['cond'] / ms['cond_native']:.2f}x |")


def native_row(c: int, h: int, batch: int, repeats: int) -> str:
    """PyTorch's GroupNorm forward and backward kernels, channels-last vs contiguous."""
    x = torch.randn(batch, c, h, h)
    g = torch.randn_like(x)
    w, b = torch.randn(c), torch.randn(c)
    groups = min(32, c // 2)
    fns = {}
    for name, fmt in (("cl", torch.channels_last), ("nchw", torch.contiguous_format)):
        xf, gf = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
        _, mean, rstd = torch.native_group_norm(xf, w, b, batch, c, h * h, groups, 1e-5)
        fns[name + "_fwd"] = (lambda xf=xf: torch.native_group_norm(
            xf, w, b, batch, c, h * h, groups, 1e-5))
        fns[name + "_bwd"] = (lambda xf=xf, gf=gf, mean=mean, rstd=rstd:
                              torch.ops.aten.native_group_norm_backward(
                                  gf, xf, mean, rstd, w, batch, c, h * h, groups,
                                  [True, True, True]))
    ms = timed(fns, repeats)
    return (f"| {batch}x{c}x{h}x{h} | {ms['cl_fwd']:.2f} | {ms['nchw_fwd']:.2f} | "
            f"{ms['cl_fwd'] / ms['nchw_fwd']:.1f}x | {ms['cl_bwd']:.2f} | "
            f"{ms['nchw_bwd']:.2f} | {ms['cl_bwd'] / ms['nchw_bwd']:.1f}x |")


def upsample_row(c: int, h: int, batch: int, repeats: int) -> str:
    """Forward + backward of interpolate-then-conv against the sub-pixel convolution."""
    cl = torch.channels_last
    x = torch.randn(batch, c, h, h).contiguous(memory_format=cl).requires_grad_()
    w = torch.randn(c, c, 3, 3).contiguous(memory_format=cl).requires_grad_()
    b = torch.randn(c, requires_grad=True)
    g = torch.randn(batch, c, 2 * h, 2 * h).contiguous(memory_format=cl)
    ms = timed({
        "ref": lambda: F.conv2d(F.interpolate(x, scale_factor=2.0), w, b,
                                padding=1).backward(g),
        "sub": lambda: upsample_conv3x3(x, w, b).backward(g),
    }, repeats)
    return (f"| {batch}x{c}x{h}x{h} -> {2 * h}x{2 * h} | {ms['ref']:.1f} | {ms['sub']:.1f} | "
            f"{ms['ref'] / ms['sub']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reuse_freed_memory()
    print(f"# CPU, torch {torch.__version__}, 1 thread, ms of forward + backward (CPU time)")
    state = "on" if native.library() is not None else "off (PyTorch-ops node twice)"
    print(f"# native kernels: {state}")
    print("| activation | GN+SiLU | fused, ops | fused, native | GN+scale-shift+SiLU+dropout "
          "| fused, ops | fused, native | native speed-up (plain) | native speed-up (cond) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, h in SHAPES:
        print(row(c, h, args.batch, args.dropout, args.repeats), flush=True)
    print("\n# PyTorch's GroupNorm kernels alone, ms (CPU time): channels-last vs contiguous")
    print("| activation | forward CL | forward NCHW | ratio | backward CL | backward NCHW "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    for c, h in SHAPES:
        print(native_row(c, h, args.batch, args.repeats), flush=True)
    print("\n# Upsample: nearest x2 + 3x3 conv vs the sub-pixel 2x2 conv, ms (CPU time)")
    print("| activation | interpolate + conv | sub-pixel | speed-up |\n|---|---|---|---|")
    for h in (8, 16, 32):
        print(upsample_row(64, h, args.batch, args.repeats), flush=True)


if __name__ == "__main__":
    main()
