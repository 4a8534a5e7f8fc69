"""CPU cost of the ResBlock's norm chain: PyTorch ops vs difflab's fused node.

Forward + backward of ``dropout(silu(GroupNorm(x) * (1 + scale) + shift))`` (the ResBlock's
second norm, time-conditioned) and of ``silu(GroupNorm(x))`` (its first norm, where the
fused node is not used since it does not win), on channels-last float32 activations of the
shapes the ``cpu`` configuration of train_throughput.py sees at batch 32. Process CPU time,
one thread, median of interleaved repeats (robust on a shared machine).

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

from difflab.networks.fused import group_norm_act

SHAPES = [(32, 32), (64, 16), (64, 8), (32, 64), (64, 32)]  # (channels, H = W)


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
    ms = timed({
        "plain": lambda: F.silu(norm(x)).backward(g),
        "plain_fused": lambda: group_norm_act(x, norm).backward(g),
        "cond": lambda: F.dropout(F.silu(norm(x) * (1 + scale) + shift), p, True).backward(g),
        "cond_fused": lambda: group_norm_act(x, norm, scale=scale, shift=shift,
                                              dropout=p).backward(g),
    }, repeats)
    return (f"| {batch}x{c}x{h}x{h} | {ms['plain']:.1f} | {ms['plain_fused']:.1f} | "
            f"{ms['cond']:.1f} | {ms['cond_fused']:.1f} | {ms['cond'] / ms['cond_fused']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"# CPU, torch {torch.__version__}, 1 thread, ms of forward + backward (CPU time)")
    print("| activation | GN+SiLU | fused | GN+scale-shift+SiLU+dropout | fused | speed-up |")
    print("|---|---|---|---|---|---|")
    for c, h in SHAPES:
        print(row(c, h, args.batch, args.dropout, args.repeats), flush=True)


if __name__ == "__main__":
    main()
