"""The fused GroupNorm -> (scale, shift) -> SiLU -> dropout node on native CPU kernels.

This node computes the same function as the PyTorch-ops node in
:mod:`difflab.networks.fused`, and takes fewer passes over memory. Each pass is one C loop
(``native/gn_act.c``):

* forward: one pass for the group moments, then one pass for
  ``y = m * silu(a x + o)``.
* backward: one pass for the per-channel sums of ``gz`` and ``gz * x``, then one pass for
  ``dx = A gz + B x + C``.

Here ``gz = dL/dz``. ``z``, ``silu'(z)`` and the dropout multiplier ``m`` are recomputed
from ``x`` and a seed; none of them is stored.

The per-(sample, channel) algebra runs in C as well. This covers ``a``, ``o``, ``A``,
``B``, ``C`` and the parameter gradients, with the closed forms of the PyTorch-ops node
(:mod:`difflab.networks.fused`). So a call costs two kernel launches each way and no small
PyTorch ops, which makes the node faster than PyTorch's GroupNorm + SiLU even on 4x4 maps.

Dropout draws one 32-bit seed from PyTorch's global generator per call. It keeps an
element at memory offset ``i`` from a counter-based hash of ``(seed, i)``. The drop
probability is ``dropout_rate(p)``, as in the PyTorch-ops node. The masks themselves
differ from that node's.

Used for float32 tensors that are contiguous or channels-last, with fewer than 2**32
elements, when :func:`difflab.networks.native.active` gives the library.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from difflab.networks import native
from difflab.networks.upsample import is_channels_last

__all__ = ["group_norm_act_native", "native_dropout_mask", "supports"]

#: at least this many tasks per call, over the batch and pixel chunks: the split of a
#: sample's rows depends on the batch only, never on the thread count, so the float sums
#: come out the same with any number of threads
_MIN_TASKS = 32


def supports(x: Tensor, *params: Tensor | None) -> ctypes.CDLL | None:
    """The kernel library if ``x`` can take the native node, else ``None``.

    ``params`` (the norm's weight and bias, ``scale``, ``shift``; ``None`` for absent
    ones) must be float32 CPU tensors too, since the kernels read them as such."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() >= 2**32:
        return None
    if x.dim() == 4 and _layout(x) is None:
        return None
    for t in params:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return None
    return native.active()


def _layout(x: Tensor) -> int | None:
    """1 channels-last, 0 contiguous, None neither (ambiguous shapes count as contiguous)."""
    if is_channels_last(x):
        return 1
    return 0 if x.is_contiguous() else None


def _split(batch: int, rows: int) -> int:
    return max(1, min(-(-_MIN_TASKS // batch), -(-rows // 64)))


def _seed() -> int:
    return int(torch.empty((), dtype=torch.int64).random_(0, 2**32))


def _check(code: int) -> None:
    if code != 0:
        raise MemoryError("native GroupNorm kernel: out of memory for scratch space")


def native_dropout_mask(lib: ctypes.CDLL, like: Tensor, threshold: int, scale: float) -> Tensor:
    """Multiplier ``0`` or ``scale`` per element, laid out like ``like`` if it is dense;
    dropped with probability ``threshold / 2**16``; the seed comes from the global RNG."""
    mask = torch.empty_like(like)  # dense: ``like``'s strides, or a suggested layout
    _check(lib.gn_dropout_mask(mask.data_ptr(), mask.numel(), _seed(), threshold, scale,
                               torch.get_num_threads()))
    return mask


def _cond(t: Tensor | None, b: int, c: int) -> tuple[int, int, int]:
    """(pointer, stride over the batch, stride over channels) of a conditioning tensor
    broadcast to [B, C, 1, 1] (a broadcast dimension gets stride 0)."""
    if t is None:
        return (0, 0, 0)
    t = t.expand(b, c, 1, 1)
    return (t.data_ptr(), t.stride(0), t.stride(1))


class _GroupNormActNative(torch.autograd.Function):
    """See :func:`group_norm_act_native`."""

    @staticmethod
    def forward(ctx, lib, x, weight, bias, scale, shift, groups, eps, silu, threshold,
                keep_scale):
        b, c, h, w = x.shape
        cl = _layout(x)
        weight, bias = weight.contiguous(), bias.contiguous()
        seed = _seed() if threshold > 0 else 0
        # the pass's settings, shared by the forward and the backward kernels
        run = (b, c, h * w, cl, groups)
        flags = (int(silu), int(threshold > 0), seed, threshold, keep_scale,
                 _split(b, h * w if cl else c))
        stats = torch.empty(4, b, c)  # a, o (z = a x + o), group mean, rstd
        y = torch.empty_like(x)
        _check(lib.gn_act_forward(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr(), *_cond(scale, b, c),
            *_cond(shift, b, c), *run, eps, *flags, stats.data_ptr(), y.data_ptr(),
            torch.get_num_threads()))
        ctx.save_for_backward(x, stats, weight, bias, scale)
        ctx.config = (lib, run, flags, shift is not None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels build no graph
    def backward(ctx, gy):
        x, stats, weight, bias, scale = ctx.saved_tensors
        lib, run, flags, has_shift = ctx.config
        b, c = run[:2]
        gy = gy.contiguous(memory_format=torch.channels_last if run[3] else
                           torch.contiguous_format)
        dx = torch.empty_like(x)
        dweight, dbias = torch.empty_like(weight), torch.empty_like(bias)
        dscale = torch.empty(b, c, 1, 1) if scale is not None else None
        dshift = torch.empty(b, c, 1, 1) if has_shift else None
        _check(lib.gn_act_backward(
            gy.data_ptr(), x.data_ptr(), stats.data_ptr(), weight.data_ptr(),
            bias.data_ptr(), *_cond(scale, b, c), *run, *flags, dx.data_ptr(),
            dweight.data_ptr(), dbias.data_ptr(),
            *(0 if t is None else t.data_ptr() for t in (dscale, dshift)),
            torch.get_num_threads()))
        return None, dx, dweight, dbias, dscale, dshift, None, None, None, None, None


def group_norm_act_native(lib: ctypes.CDLL, x: Tensor, weight: Tensor, bias: Tensor,
                          scale: Tensor | None, shift: Tensor | None, groups: int, eps: float,
                          silu: bool, threshold: int, keep_scale: float) -> Tensor:
    """``m * silu(groupnorm(x) * (1 + scale) + shift)`` (no SiLU if ``silu`` is false).

    ``m`` is 0 with probability ``threshold / 2**16`` and ``keep_scale`` otherwise. The
    caller gets ``lib`` from :func:`supports`."""
    return _GroupNormActNative.apply(lib, x, weight, bias, scale, shift, groups, eps, silu,
                                     threshold, keep_scale)
