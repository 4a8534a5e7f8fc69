"""The native CPU kernels: build and fallback, numerics at the edges, thread invariance."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks import native
from difflab.networks.fused import group_norm_act
from difflab.networks.fused_native import supports


@pytest.fixture
def lib():
    found = native.library()
    assert found is not None, "the native kernels did not build on this machine"
    return found


def _norm(c: int, groups: int, gamma: float = 1.0, seed: int = 0) -> nn.GroupNorm:
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(groups, c)
    with torch.no_grad():
        norm.weight.copy_(gamma * (1 + torch.rand(c, generator=g)))
        norm.bias.copy_(torch.randn(c, generator=g))
    return norm


def _reference(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = True) -> torch.Tensor:
    """float64 GroupNorm -> SiLU."""
    z = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(),
                     norm.eps)
    return F.silu(z) if silu else z


def test_build_is_cached_and_reused(tmp_path, lib):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    # no temporary left; the SHA-256 recorded at build time sits next to the library
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]


def test_failed_build_names_the_compiler_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="false failed on gn_act.c"):
        native.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})  # forget the library loaded so far
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
        assert native.library() is None
    x = torch.randn(2, 4, 5, 5)
    norm = _norm(4, 2)
    assert supports(x) is None
    torch.testing.assert_close(group_norm_act(x, norm).double(), _reference(x, norm),
                               atol=1e-5, rtol=1e-5)


def test_environment_switch_turns_the_kernels_off(monkeypatch, lib):
    x = torch.randn(2, 4, 5, 5)
    assert supports(x) is lib
    monkeypatch.setenv("DIFFLAB_NATIVE", "0")
    assert native.library() is None and supports(x) is None
    monkeypatch.delenv("DIFFLAB_NATIVE")
    with native.disabled():
        assert supports(x) is None
    assert supports(x) is lib


def test_only_dense_float32_cpu_tensors_take_the_kernels(lib):
    x = torch.randn(2, 4, 6, 6)
    assert supports(x) is lib
    assert supports(x.contiguous(memory_format=torch.channels_last)) is lib
    assert supports(x.double()) is None
    assert supports(x[:, :, ::2]) is None  # strided: the PyTorch-ops node
    assert supports(x, torch.ones(4), torch.zeros(4)) is lib
    assert supports(x, torch.ones(4, dtype=torch.float64), None) is None  # read as float32
    assert supports(x, None, torch.zeros(4, dtype=torch.float16)) is None
    norm = _norm(4, 2)
    torch.testing.assert_close(group_norm_act(x[:, :, ::2], norm).double(),
                               _reference(x[:, :, ::2], norm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_over_the_whole_float_range(channels_last, lib):
    """z = gamma * xhat + beta sweeps [-180, 180]: the exponential's clamp, its range
    reduction and the sigmoid's saturation on both sides. The node without SiLU gives the
    same z, so SiLU's own error is measured against float64."""
    x = torch.linspace(-1, 1, 2001).expand(2, 4, 2001).reshape(2, 4, 2001, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = _norm(4, 4, gamma=60.0)
    z = group_norm_act(x, norm, silu=False).double()
    y = group_norm_act(x, norm).double()
    ref = F.silu(z)
    assert z.min() < -150 and z.max() > 150
    normal = ref.abs() > 1e-30  # below, float32 has nothing to say (silu(-180) ~ 1e-76)
    assert ((y - ref)[normal] / ref[normal]).abs().max() < 4e-7  # a few float32 ulp
    assert (y - ref)[~normal].abs().max() < 1e-30
    assert torch.isfinite(y).all()
    torch.testing.assert_close(z, _reference(x, norm, silu=False), atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_results_do_not_depend_on_the_thread_count(channels_last, lib):
    """Batch 3 splits each sample's pixels over several tasks; sums must not depend on
    how many threads run them."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, 40, 40) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = _norm(16, 4)
    scale = torch.randn(3, 16, 1, 1, requires_grad=True)
    gy = torch.randn_like(x)

    def run(threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xx = x.clone().requires_grad_()
            torch.manual_seed(3)
            y = group_norm_act(xx, norm, scale=scale, dropout=0.2)
            grads = torch.autograd.grad(y, [xx, norm.weight, norm.bias, scale], gy)
            return [y, *grads]
        finally:
            torch.set_num_threads(old)

    one, two = run(1), run(2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    ref = _reference(x, norm)  # the split sums are right, not only repeatable
    y_nodrop = group_norm_act(x, norm, scale=torch.zeros(3, 16, 1, 1))
    torch.testing.assert_close(y_nodrop.double(), ref, atol=2e-5, rtol=2e-5)


def test_nan_input_propagates_to_output_and_gradients(lib):
    x = torch.randn(2, 4, 6, 6)
    x[1, 0, 2, 3] = math.nan
    x.requires_grad_()
    norm = _norm(4, 2)
    y = group_norm_act(x, norm, dropout=0.1)
    assert torch.isnan(y[1, :2]).any() and not torch.isnan(y[0]).any()
    y.sum().backward()
    assert torch.isnan(x.grad[1, :2]).any() and torch.isnan(norm.weight.grad).any()


def test_masks_follow_the_global_seed(lib):
    x = torch.randn(4, 8, 10, 10)
    norm = _norm(8, 4)
    torch.manual_seed(11)
    a = group_norm_act(x, norm, dropout=0.5)
    torch.manual_seed(11)
    b = group_norm_act(x, norm, dropout=0.5)
    c = group_norm_act(x, norm, dropout=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(tmp_path / "here"))
    assert native._cache_dir() == tmp_path / "here"
    monkeypatch.delenv("DIFFLAB_NATIVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native._cache_dir() == tmp_path / "difflab" / "native"
    assert os.path.isabs(native._cache_dir())


def test_unwritable_cache_folder_falls_back_to_the_temporary_directory(monkeypatch, tmp_path,
                                                                      lib):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DIFFLAB_NATIVE_CACHE", str(blocker / "native"))
    with pytest.warns(RuntimeWarning, match="native kernel cache not used"):
        path = native.build()
    assert path.exists() and path.parent.name.startswith("difflab-native-")
    # a new private folder each time (mkdtemp), never a fixed name someone could make first
    assert path.parent.stat().st_mode & 0o777 == 0o700 and path.parent.stat().st_uid == os.getuid()
    with pytest.warns(RuntimeWarning, match="native kernel cache not used"):
        assert native.build().parent != path.parent


@pytest.mark.slow
def test_module_entry_point_reports_the_state():
    cmd = [sys.executable, "-m", "difflab.networks.native"]
    on = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert on.returncode == 0 and on.stdout.startswith("native CPU kernels: on (")
    off = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DIFFLAB_NATIVE": "0"})
    assert off.returncode == 1 and "DIFFLAB_NATIVE=0" in off.stdout


def test_second_derivatives_are_refused_not_silently_zero(lib):
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = group_norm_act(x, _norm(4, 2))
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


def test_broadcast_conditioning_matches_the_reference(lib):
    """scale and shift of shape [1, C, 1, 1] apply to every sample (stride 0 in C), and
    their gradients sum over the batch."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    norm = _norm(8, 4)
    scale = torch.randn(1, 8, 1, 1, requires_grad=True)
    shift = torch.randn(1, 8, 1, 1, requires_grad=True)
    y = group_norm_act(x, norm, scale=scale, shift=shift)
    ref = F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps) * (1 + scale) + shift)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    ins = [x, norm.weight, norm.bias, scale, shift]
    gy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(ref, ins, gy),
                    strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
