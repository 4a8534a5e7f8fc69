"""The sub-pixel upsampling convolution equals nearest x2 upsampling then a 3x3 conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflab.networks.unet import Upsample
from difflab.networks.upsample import (
    _Interleave,
    interleave_phases,
    subpixel_kernel,
    upsample_conv3x3,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 2, 1, 1), (3, 5, 5, 3)])
def test_equals_upsample_then_conv_with_gradients(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    b, i, h, w = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(4, i, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    y, y_ref = upsample_conv3x3(x, weight, bias), _reference(x, weight, bias)
    assert y.shape == (b, 4, 2 * h, 2 * w)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, weight, bias), gy)
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), gy)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)
    if channels_last and h * w > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(upsample_conv3x3, (x[:1, :, :3, :3].detach()
                                                       .requires_grad_(), weight, None))


def test_kernel_taps_sum_to_the_original_kernel():
    """Each phase's 2x2 kernel redistributes the 3x3 taps, so every phase sums to the same
    total, the response to a constant image away from the borders."""
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    k = subpixel_kernel(w).view(4, 3, 2, 2, 2)
    torch.testing.assert_close(k.sum((-1, -2)), w.sum((-1, -2)).expand(4, 3, 2))


def test_module_keeps_its_parameters_and_float32_agrees():
    torch.manual_seed(0)
    up = Upsample(6)
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"}
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(up(x), up.conv(F.interpolate(x, scale_factor=2.0)),
                               atol=1e-5, rtol=1e-5)


def test_compile_path_equals_the_strided_copy():
    """Under torch.compile the phases are interleaved by slicing and stacking
    (``interleave_phases``); it equals the eager strided copy, values and gradients, and
    the module traces (aot_eager: no C++ compiler needed)."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 12, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a, b = interleave_phases(y, 4, 3), _Interleave.apply(y, 4, 3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    gy = torch.randn(a.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(a, y, gy)[0],
                               torch.autograd.grad(b, y, gy)[0], atol=0, rtol=0)
    up = Upsample(3).double()
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    compiled = torch.compile(up, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), _reference(x, up.conv.weight, up.conv.bias),
                               atol=1e-12, rtol=1e-12)
