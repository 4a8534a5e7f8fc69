"""Fused ``GroupNorm -> (adaptive scale-shift) -> SiLU -> dropout`` with a closed-form backward.

The U-Net's normalisation chains (Wu & He 2018, "Group Normalization"; the adaptive
GroupNorm ``norm(h) * (1 + scale) + shift`` of Nichol & Dhariwal 2021; SiLU, Elfwing et al.
2018; inverted dropout, Srivastava et al. 2014) as one autograd node, for the CPU, where
PyTorch's channels-last GroupNorm kernels are slow (forward up to 6.7x, backward up to 4.5x
slower than on contiguous tensors of the same shape, ``benchmarks/fused_ops.py``):

* forward: per-channel sums ``sum x`` and ``sum x^2`` over the pixels (two reductions that
  vectorise across channels in either layout), combined per group into the mean ``mu`` and
  ``rstd = 1 / sqrt(var + eps)``; the norm's affine, the time conditioning and the
  normalisation folded into one per-(sample, channel) affine ``z = a x + b`` (one pass);
  then SiLU and the dropout mask;
* backward: with ``g = dL/dz`` and ``k = dz/dxhat`` (``gamma``, or ``gamma (1 + scale)``),
  GroupNorm's input gradient (Wu & He 2018, eq. 1-4, differentiated) is
  ``dx = rstd (k g - mean_G(k g) - xhat mean_G(k g xhat))``, means over each group. It needs
  two per-channel sums, ``sum g`` and ``sum g x`` (then ``sum g xhat = rstd (sum g x - mu
  sum g)``), and one pass of two fused multiply-adds; the parameter and conditioning
  gradients are those sums too.

Statistics use ``E[x^2] - mu^2`` with float32 sums (float64 for the per-group combination),
as PyTorch's channels-last kernel does. The math is the reference ops' (tests/test_fused.py
checks values and gradients against them in float64 and float32).

float32 tensors take the native kernels of :mod:`difflab.networks.fused_native` when
they are available (one pass over memory per step, built with the machine's C compiler),
and these PyTorch ops otherwise.

Dropout masks compare 16-bit words of PyTorch's global generator with a threshold (four
words per 64-bit draw, which take about a quarter of ``bernoulli_``'s time on the CPU): an element
is dropped with probability ``p_hat = round(p * 2**16) / 2**16``, within 7.7e-6 of ``p``, and
kept ones are scaled by ``1 / (1 - p_hat)``, so the mask's mean is exactly 1 as inverted
dropout requires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.networks.fused_native import group_norm_act_native, native_dropout_mask, supports

__all__ = ["dropout_mask", "dropout_rate", "group_norm_act", "reference_ops", "use_fused"]

_WORD = 2**16  # dropout resolution: 16-bit words


_REFERENCE_ONLY = [0]  # depth of reference_ops() contexts


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Inside it the blocks use the reference PyTorch ops, whose graphs can be
    differentiated twice (the fused node's closed-form backward is once-differentiable):
    for gradient penalties such as R1 through a network."""
    _REFERENCE_ONLY[0] += 1
    try:  # attention too: the math kernel of scaled_dot_product_attention
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            yield
    finally:
        _REFERENCE_ONLY[0] -= 1


def use_fused(x: Tensor) -> bool:
    """Whether a block should take the fused path for ``x``: eager float32/float64 on the
    CPU, outside :func:`reference_ops`. Under autocast the reference ops keep autocast's
    per-op precision, under ``torch.compile`` they leave fusion to the compiler, and on
    CUDA the native kernels are already fast."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not _REFERENCE_ONLY[0]
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def dropout_rate(p: float) -> float:
    """The drop probability :func:`dropout_mask` realises for ``p``: ``p`` rounded to a
    multiple of ``2**-16`` (at most ``1 - 2**-16``)."""
    return min(round(p * _WORD), _WORD - 1) / _WORD


def _keep_mask(like: Tensor, p: float, scale: float) -> Tensor:
    """``scale`` where kept (probability ``1 - dropout_rate(p)``), 0 where dropped,
    independently, shaped and laid out like ``like``; from the global RNG."""
    n = like.numel()
    # 64-bit draws over the full range: four independent uniform 16-bit words each
    # (random_() without bounds would leave the top bit 0).
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    words = draws.random_(-(2**63), 2**63 - 1).view(torch.int16)[:n]
    if _dense(like):
        words = words.as_strided(like.shape, like.stride())
    else:
        words = words.view(like.shape)
    keep = words >= _threshold(p) - _WORD // 2  # P(drop) = k / 2**16
    # a float mask: multiplying by it is several times faster than masked_fill_ on the CPU
    mask = keep.to(like.dtype)
    return mask if scale == 1.0 else mask.mul_(scale)


def dropout_mask(like: Tensor, p: float) -> Tensor:
    """Inverted-dropout multiplier shaped and laid out like ``like`` (global RNG).

    Each element is 0 with probability ``p_hat = dropout_rate(p)`` (within 7.7e-6 of
    ``p``) and ``1 / (1 - p_hat)`` otherwise, independently. :func:`group_norm_act` draws
    the same mask from the same RNG state, for a ``like`` of its input's dtype and layout
    (float32 masks come from the native kernels' generator when those are active)."""
    scale = 1.0 / (1.0 - dropout_rate(p))
    lib = supports(like)
    if lib is not None:
        return native_dropout_mask(lib, like, _threshold(p), scale)
    return _keep_mask(like, p, scale)


def _threshold(p: float) -> int:
    """Dropped iff a uniform 16-bit word is below this: ``dropout_rate(p) * 2**16``."""
    return round(dropout_rate(p) * _WORD)


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly (contiguous in some dim order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _group_stats(x: Tensor, groups: int, eps: float, buf: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, rstd)`` of each channel's group, ``[B, C, 1, 1]`` each, in
    ``x.dtype``; ``buf`` (shaped like ``x``) is scratch space for ``x^2``."""
    b, c, h, w = x.shape
    # float32 sums over the pixels (a float64 accumulation is several times slower on
    # the CPU), combined per group in float64
    s = torch.stack((x.sum((2, 3)), torch.mul(x, x, out=buf).sum((2, 3))))  # [2, B, C]
    s = s.view(2, b, groups, c // groups).sum(-1, dtype=torch.float64) / (h * w * c // groups)
    mean, ex2 = s.unbind(0)  # [B, G]
    rstd = torch.addcmul(ex2, mean, mean, value=-1).clamp_min_(0.0).add_(eps).rsqrt_()
    stats = torch.stack((mean, rstd)).to(x.dtype)[..., None]  # [2, B, G, 1]
    stats = stats.expand(2, b, groups, c // groups).reshape(2, b, c, 1, 1)
    return stats[0], stats[1]


def _conditioning(weight: Tensor, bias: Tensor, scale: Tensor | None,
                  shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(k, off, 1 + scale)``: ``z = k xhat + off`` per (sample, channel)."""
    c = weight.shape[0]
    gamma, beta = weight.view(1, c, 1, 1), bias.view(1, c, 1, 1)
    if scale is None:
        k, off, one_s = gamma, beta, None
    else:
        one_s = 1 + scale
        k, off = gamma * one_s, beta * one_s
    if shift is not None:
        off = off + shift
    return k, off, one_s


def _input_grad_coefficients(s0: Tensor, t: Tensor, mean: Tensor, rstd: Tensor, k: Tensor,
                             groups: int, hw: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, b, c)`` with ``dx = a g + b x + c``, from ``s0 = sum g`` and
    ``t = sum g xhat`` per (sample, channel) (module docstring)."""
    n, ch = s0.shape[:2]
    # group means of dL/dxhat (mg[0]) and of dL/dxhat * xhat (mg[1])
    mg = torch.stack((k * s0, k * t)).view(2, n, groups, ch // groups)
    mg = (mg.mean(-1, keepdim=True) / hw).expand(2, n, groups, ch // groups)
    mg = mg.reshape(2, n, ch, 1, 1)
    # dx = rstd (k g - mg1 - xhat mg2)
    #    = (rstd k) g - (rstd^2 mg2) x + (mean rstd^2 mg2 - rstd mg1)
    r2mg2 = rstd * rstd * mg[1]
    return rstd * k, -r2mg2, torch.addcmul(mean * r2mg2, rstd, mg[0], value=-1)


def _param_grads(s0: Tensor, t: Tensor, weight: Tensor, bias: Tensor, one_s: Tensor | None,
                 has_shift: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients of the norm's weight and bias and of ``scale`` and ``shift``."""
    c = s0.shape[1]
    g_shift = s0 if has_shift else None
    if one_s is None:
        return t.sum(0).view(c), s0.sum(0).view(c), None, g_shift
    g_scale = torch.addcmul(weight.view(1, c, 1, 1) * t, bias.view(1, c, 1, 1), s0)
    return (t * one_s).sum(0).view(c), (s0 * one_s).sum(0).view(c), g_scale, g_shift


class _GroupNormAct(torch.autograd.Function):
    """See :func:`group_norm_act`. ``scale`` and ``shift`` are [B, C, 1, 1] or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, silu, p, scale_kept):
        z = torch.empty_like(x)
        mean, rstd = _group_stats(x, groups, eps, buf=z)
        k, off, one_s = _conditioning(weight, bias, scale, shift)
        a = k * rstd  # z = k (x - mean) rstd + off = a x + (off - a mean): one pass
        torch.addcmul(torch.addcmul(off, a, mean, value=-1), x, a, out=z)
        y = F.silu(z) if silu else z
        mask = None
        if p > 0:
            mask = _keep_mask(y, p, 1.0 / (1.0 - dropout_rate(p)) if scale_kept else 1.0)
            y = y.mul_(mask) if silu else y * mask
        ctx.save_for_backward(x, z if silu else None, mask, mean, rstd, k, weight, bias, one_s)
        ctx.groups, ctx.has_shift = groups, shift is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, z, mask, mean, rstd, k, weight, bias, one_s = ctx.saved_tensors
        # Fresh full-size tensors cost page faults on the CPU, about as much as a pass
        # over memory: the masked gradient becomes g, and g * x becomes dx.
        if mask is not None:
            gy = gy * mask
        if z is None:
            gz = gy
        elif mask is not None:
            gz = torch.ops.aten.silu_backward.grad_input(gy, z, grad_input=gy)
        else:
            gz = torch.ops.aten.silu_backward(gy, z)
        s0 = gz.sum((2, 3), keepdim=True)  # sum_hw g        [B, C, 1, 1]
        buf = gz * x
        # sum_hw g xhat = rstd (sum_hw g x - mean sum_hw g)
        t = torch.addcmul(buf.sum((2, 3), keepdim=True), mean, s0, value=-1).mul_(rstd)
        a, b, c = _input_grad_coefficients(s0, t, mean, rstd, k, ctx.groups,
                                           x.shape[2] * x.shape[3])
        dx = torch.addcmul(c, x, b, out=buf)  # one pass of two fused multiply-adds
        dx.addcmul_(gz, a)
        return (dx, *_param_grads(s0, t, weight, bias, one_s, ctx.has_shift),
                None, None, None, None, None)


def group_norm_act(
    x: Tensor,
    norm: torch.nn.GroupNorm,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
    dropout: float = 0.0,
    scale_kept: bool = True,
) -> Tensor:
    """``dropout(silu(norm(x) * (1 + scale) + shift))`` in one fused autograd node.

    Args:
        x: ``[B, C, H, W]`` (contiguous or channels-last; the output follows ``x``).
        norm: the ``nn.GroupNorm`` whose groups, eps and affine parameters are used.
        scale, shift: optional ``[B, C, 1, 1]`` adaptive-GroupNorm conditioning (Nichol &
            Dhariwal 2021); ``scale=None`` means a factor of 1, ``shift=None`` means 0.
        silu: apply SiLU (``False``: the normalised, conditioned features themselves).
        dropout: inverted-dropout rate applied last (0 in eval mode).
        scale_kept: scale the kept elements by ``1 / (1 - dropout_rate(dropout))``
            (inverted dropout). ``False`` leaves them unscaled, for a caller that folds the
            factor into the next linear layer's weight instead (one pass less each way).

    Returns:
        ``[B, C, H, W]``, equal to the reference ops up to float rounding (dropout masks
        differ: they come from :func:`dropout_mask`).
    """
    if not norm.affine:
        raise ValueError("group_norm_act needs an affine GroupNorm")
    lib = supports(x, norm.weight, norm.bias, scale, shift)
    if lib is not None:
        keep = 1.0 / (1.0 - dropout_rate(dropout)) if scale_kept and dropout > 0 else 1.0
        return group_norm_act_native(lib, x, norm.weight, norm.bias, scale, shift,
                                     norm.num_groups, norm.eps, silu, _threshold(dropout), keep)
    return _GroupNormAct.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups,
                               norm.eps, silu, float(dropout), scale_kept)
