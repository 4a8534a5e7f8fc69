"""The fused GroupNorm/scale-shift/SiLU/dropout node equals the reference PyTorch ops.

float32 runs on both backends: the native kernels (difflab.networks.native, active where
a C compiler is found) and the PyTorch-ops node; float64 always takes the PyTorch-ops node.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difflab.networks.unet as unet_mod
from difflab.networks import UNet, UNetConfig, native
from difflab.networks.fused import dropout_mask, dropout_rate, group_norm_act, use_fused

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["native", "ops"])
def backend(request):
    """Run the test with the native kernels, then with the PyTorch-ops node."""
    if request.param == "native":
        assert native.library() is not None, "the native kernels did not build"
        yield request.param
    else:
        with native.disabled():
            yield request.param


def _setup(dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h = 3, 8, 5
    x = torch.randn(b, c, h, h, generator=g, dtype=dtype) * 2 + 0.5  # off-centre on purpose
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = nn.GroupNorm(4, c).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
    cond = {k: torch.randn(b, c, 1, 1, generator=g, dtype=dtype) for k in ("e", "s", "sh")}
    gy = torch.randn(x.shape, generator=g, dtype=dtype)
    return x.requires_grad_(), norm, {k: v.requires_grad_() for k, v in cond.items()}, gy


def _reference(x, norm, cond, mode, silu=True):
    h = norm(x + cond["e"] if mode == "add" else x)
    if mode in ("scale_shift", "scale"):
        h = h * (1 + cond["s"])
    if mode == "scale_shift":
        h = h + cond["sh"]
    return F.silu(h) if silu else h


def _fused(x, norm, cond, mode, p=0.0, silu=True):
    if mode == "add":
        return group_norm_act(x + cond["e"], norm, dropout=p, silu=silu)
    kw = {"scale": cond["s"]} if mode != "plain" else {}
    if mode == "scale_shift":
        kw["shift"] = cond["sh"]
    return group_norm_act(x, norm, dropout=p, silu=silu, **kw)


def _inputs(x, norm, cond, mode):
    extra = {"add": ["e"], "scale": ["s"], "scale_shift": ["s", "sh"]}.get(mode, [])
    return [x, norm.weight, norm.bias] + [cond[k] for k in extra]


@pytest.mark.parametrize("mode", ["plain", "add", "scale", "scale_shift"])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_forward_and_gradients_match_reference(mode, silu, channels_last, dtype, tol,
                                               backend):
    x, norm, cond, gy = _setup(dtype, channels_last)
    ins = _inputs(x, norm, cond, mode)
    y_ref = _reference(x, norm, cond, mode, silu)
    g_ref = torch.autograd.grad(y_ref, ins, gy)
    y = _fused(x, norm, cond, mode, silu=silu)
    g = torch.autograd.grad(y, ins, gy)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_equals_reference_times_mask_and_gradients(silu, dtype, tol, channels_last,
                                                           backend):
    x, norm, cond, gy = _setup(dtype, channels_last)
    p = 0.3
    torch.manual_seed(5)
    y = _fused(x, norm, cond, "scale_shift", p, silu)
    torch.manual_seed(5)  # the same global-RNG draw gives the same mask
    mask = dropout_mask(x.detach(), p)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    y_ref = _reference(x, norm, cond, "scale_shift", silu) * mask
    ins = _inputs(x, norm, cond, "scale_shift")
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    for a, b in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(y_ref, ins, gy),
                    strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_rate_scale_and_independence(p, backend):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of the four words per draw
    q = dropout_rate(p)
    assert abs(q - p) <= 2**-17 and q * 2**16 == round(q * 2**16)
    m = dropout_mask(torch.empty(n), p)
    kept = m != 0
    assert torch.all(m[kept] == torch.tensor(1 / (1 - q), dtype=m.dtype))
    sd = math.sqrt(n * q * (1 - q))  # binomial: the dropped count is within 5 sd of n q
    assert abs(int((~kept).sum()) - n * q) < 5 * sd
    # each of the four 16-bit words of a draw drops at the same rate (none is biased, as
    # the top word of a non-negative random_() would be), and neighbours are independent
    words = (~kept[: n // 4 * 4]).view(-1, 4).float()
    sd_w = math.sqrt(q * (1 - q) / len(words))
    assert torch.all((words.mean(0) - q).abs() < 5 * sd_w)
    both = (words[:, 0] * words[:, 1]).mean()
    assert abs(float(both) - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / len(words))
    assert torch.all(dropout_mask(torch.empty(1000), 0.0) == 1)
    # the next call draws a new mask, independent of the first
    again = dropout_mask(torch.empty(n), p) == 0
    both = float((again & ~kept).float().mean())
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)


def test_dropout_mask_follows_the_layout(backend):
    x = torch.empty(4, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    m = dropout_mask(x, 0.3)
    assert m.is_contiguous(memory_format=torch.channels_last)
    strided = torch.empty(4, 6, 10)[:, :, ::2]  # not dense: a contiguous mask
    assert dropout_mask(strided, 0.3).shape == strided.shape


def test_use_fused_only_in_eager_cpu_float():
    x = torch.zeros(2)
    assert use_fused(x) and not use_fused(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_fused(x)


@pytest.mark.parametrize("conditioning", ["add", "scale_shift"])
def test_unet_fused_path_matches_reference_path(conditioning, monkeypatch, backend):
    """Covers the fused norms at every size (native) or from 16x16 up and PyTorch's below
    (ops node, unet.MIN_FUSED_PIXELS)."""
    torch.manual_seed(0)
    cfg = UNetConfig(base_channels=16, num_res_blocks=1, num_heads=2, image_size=8,
                     channel_mult=(1, 2), attention_resolutions=(4, 8),
                     time_conditioning=conditioning, dropout=0.1)
    net = UNet(cfg).to(memory_format=torch.channels_last)
    with torch.no_grad():  # wake the zero-initialised layers
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3.0, 700.0])

    def loss_and_grads():
        net.zero_grad()
        net.eval()  # dropout off in both paths; grads still flow
        loss = net(x, t).square().sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    fused = loss_and_grads()
    monkeypatch.setattr(unet_mod, "use_fused", lambda h: False)
    ref = loss_and_grads()
    torch.testing.assert_close(fused[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fused[1], ref[1], strict=True):  # float32 sums in another order
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_resblock_dropout_in_training_equals_reference_with_the_same_mask(scale_shift, dtype,
                                                                          tol, backend):
    """The training-mode ResBlock (dropout's 1/(1-p) folded into conv2's weight) equals
    GroupNorm -> conditioning -> SiLU -> inverted dropout -> conv2, values and gradients."""
    torch.manual_seed(0)
    block = unet_mod.ResBlock(8, 12, 16, dropout=0.3, scale_shift=scale_shift,
                              max_groups=4).to(dtype).train()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 8, 6, 6, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    emb = torch.randn(3, 16, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    y = block(x, emb)
    h = block.conv1(F.silu(block.norm1(x)))
    e = block.emb_proj(emb)[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = block.norm2(h) * (1 + scale) + shift
    else:
        h = block.norm2(h + e)
    torch.manual_seed(7)  # the ResBlock's only draw is its dropout mask
    h = F.silu(h) * dropout_mask(h.detach(), 0.3)
    y_ref = block.skip(x) + block.conv2(h)
    torch.testing.assert_close(y, y_ref, atol=tol / 100, rtol=tol / 100)
    ins = [x, emb, *block.parameters()]
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(y_ref, ins, gy),
                    strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
