"""Gaussian teleportation (difflab.samplers.teleport): exact on Gaussian data, second order in
1 / sigma~_skip on a mixture; the Gaussian head spends no model evaluation above the skip
level and keeps a sampler as accurate with one evaluation fewer."""

import math

import pytest
import torch

from difflab.analytic import GaussianData, GaussianMixture
from difflab.process import make_process
from difflab.samplers import CountingDenoiser, plms, unipc_bh2
from difflab.samplers.teleport import (
    GaussianDenoiser,
    GaussianHead,
    GaussianMoments,
    data_moments,
    skip_level,
    teleport,
)

F64 = torch.float64


def t_at(process, sigma_tilde: float) -> torch.Tensor:
    return process.t_from_log_snr(torch.tensor(-2 * math.log(sigma_tilde), dtype=F64))


def mixture_moments(mu, std, w) -> GaussianMoments:
    m = (w[:, None] * mu).sum(0)
    d = mu - m
    cov = torch.diag((w[:, None] * std**2).sum(0)) + (w[:, None, None] * d[:, :, None]
                                                      * d[:, None, :]).sum(0)
    lam, vec = torch.linalg.eigh(cov)
    return GaussianMoments(m, lam, vec)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "ve"])
def test_exact_on_gaussian_data_diagonal(schedule):
    p = make_process(schedule, **({"sigma_max": 80.0} if schedule == "ve" else {}))
    mu = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    std = torch.tensor([0.05, 0.5, 1.5], dtype=F64)
    data = GaussianData(p, mu, std)
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = x * float(p.sigma(p.t_max))
    t = t_at(p, 0.7)
    got = teleport(p, x, p.t_max, t, GaussianMoments(mu, std**2))
    torch.testing.assert_close(got, data.ode_solution(x, p.t_max, t), rtol=1e-12, atol=1e-12)


def test_exact_on_rotated_gaussian_full_covariance():
    """A full covariance Q diag(s^2) Q^T: the map is the diagonal one seen through Q."""
    p = make_process("linear")
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=g))
    mu = torch.randn(4, dtype=F64, generator=g)
    std = torch.tensor([0.1, 0.3, 1.0, 2.0], dtype=F64)
    data = GaussianData(p, mu, std)
    x = torch.randn(8, 4, dtype=F64, generator=g) * 3.0
    t0, t1 = t_at(p, 20.0), t_at(p, 0.5)
    want = data.ode_solution(x @ q, t0, t1) @ q.T
    moments = GaussianMoments(mu @ q.T, std**2, q)
    torch.testing.assert_close(teleport(p, x, t0, t1, moments), want, rtol=1e-12, atol=1e-12)


def test_zero_terminal_snr_start_is_the_limit():
    """At alpha(t_max) = 0 the map is mu + sqrt(C + s^2) x / sigma (finite), the limit of
    starting ever closer to t_max."""
    p = make_process("linear", zero_terminal_snr=True)
    assert float(p.alpha(p.t_max)) == 0
    mu = torch.tensor([1.0, -0.5], dtype=F64)
    m = GaussianMoments(mu, torch.tensor([0.04, 1.0], dtype=F64))
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = t_at(p, 2.0)
    got = teleport(p, x, p.t_max, t, m)
    a = float(p.alpha(t))
    want = a * (mu + (m.eigvals + 4.0).sqrt() * x / float(p.sigma(p.t_max)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    near = teleport(p, x, p.t_max - 1e-3, t, m)
    assert float((near - got).abs().max()) < 1e-3


def test_mixture_error_is_second_order_in_the_skip_level():
    """On a mixture (not Gaussian) the map's error against the exact PF-ODE, in y = x / alpha,
    falls like sigma~_skip^-2: each doubling of the level divides it by ~4."""
    p = make_process("cosine")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, dtype=F64, generator=g)
    std = torch.full((3, 4), 0.2, dtype=F64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    data = GaussianMixture(p, mu, std, w)
    moments = mixture_moments(mu, std, w)
    x = torch.randn(32, 4, dtype=F64, generator=g) * float(p.sigma(p.t_max))
    errs = []
    for s in (4.0, 8.0, 16.0, 32.0):
        t = t_at(p, s)
        ref = data.ode_solution(x, float(p.t_max), float(t))
        errs.append(float(((teleport(p, x, p.t_max, t, moments) - ref)
                           / float(p.alpha(t))).pow(2).mean().sqrt()))
    ratios = [a / b for a, b in zip(errs, errs[1:], strict=False)]
    assert all(r > 3.0 for r in ratios), (errs, ratios)
    assert errs[-1] < 1e-3 * 32.0  # small against the level it lands on


def test_gaussian_denoiser_is_the_exact_one():
    p = make_process("linear", zero_terminal_snr=True)
    mu = torch.tensor([0.5, -1.0, 0.0], dtype=F64)
    std = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    exact, ours = GaussianData(p, mu, std), GaussianDenoiser(p, GaussianMoments(mu, std**2))
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    for t in (1.0, 500.0, float(p.t_max), torch.tensor([1.0, 10.0, 900.0, 1000.0])):
        a, b = exact(x, t), ours(x, t)
        torch.testing.assert_close(b.x0, a.x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.eps, a.eps, rtol=1e-12, atol=1e-12)


def test_gaussian_head_calls_the_model_only_below_the_skip_level():
    p = make_process("cosine")
    mu = torch.zeros(2, dtype=F64)
    model = CountingDenoiser(GaussianMixture(p, torch.tensor([[1.0, 0.0], [-1.0, 0.0]],
                                                             dtype=F64), 0.1))
    moments = GaussianMoments(mu, torch.tensor([1.0, 0.01], dtype=F64))
    head = GaussianHead(model, moments, 10.0)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    gauss = GaussianDenoiser(p, moments)
    assert torch.equal(head(x, t_at(p, 50.0)).x0, gauss(x, t_at(p, 50.0)).x0)
    assert model.nfe == 0
    assert torch.equal(head(x, t_at(p, 10.0)).x0, model.inner(x, t_at(p, 10.0)).x0)
    assert model.nfe == 1  # the skip level itself goes to the model
    ts = torch.stack([t_at(p, 50.0), t_at(p, 1.0), t_at(p, 50.0)])
    mixed = head(x, ts)
    assert torch.equal(mixed.eps[0], gauss(x, ts).eps[0])
    assert torch.equal(mixed.eps[1], model.inner(x, ts).eps[1])
    with pytest.raises(ValueError, match="sigma_skip"):
        GaussianHead(model, moments, 0.0)


def test_gaussian_head_saves_the_wasted_first_evaluation():
    """From the cosine schedule's sigma~_max = 2e4 a sampler's first evaluation only returns
    the data mean. With the head it costs nothing: on t_max and the levels L, a sampler is as
    accurate as without the head (one evaluation more) and more accurate than without the
    head on t_max and L less its first level (the same evaluations)."""
    p = make_process("cosine")
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(3, 2, dtype=F64, generator=g)
    data = GaussianMixture(p, mu, torch.full((3, 2), 0.3, dtype=F64))
    moments = data_moments(data.sample(4096, g))
    x = torch.randn(256, 2, dtype=F64, generator=g) * float(p.sigma(p.t_max))
    ref = data.ode_solution(x, float(p.t_max), float(p.t_min))
    t_max, end = (torch.tensor(float(t), dtype=F64) for t in (p.t_max, p.t_min))
    levels = [t_at(p, s) for s in (skip_level(moments), 3.0, 1.0, 0.3, 0.1)]
    err = lambda y: float((y - ref).pow(2).mean().sqrt())  # noqa: E731
    for sampler in (plms, unipc_bh2):
        counted = CountingDenoiser(data)
        head = sampler(GaussianHead(counted, moments, skip_level(moments)), x,
                       torch.stack([t_max, *levels, end]))
        assert counted.nfe == len(levels)
        more = sampler(data, x, torch.stack([t_max, *levels, end]))
        same = sampler(data, x, torch.stack([t_max, *levels[1:], end]))
        assert err(head) < 1.02 * err(more), sampler.__name__
        assert err(head) < 0.85 * err(same), sampler.__name__


def test_data_moments_full_and_diagonal():
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=g))
    std = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    x = (torch.randn(20000, 3, dtype=F64, generator=g) * std) @ q.T + 1.0
    full = data_moments(x)
    assert full.eigvecs is not None
    cov = full.eigvecs @ torch.diag(full.eigvals) @ full.eigvecs.T
    torch.testing.assert_close(cov, q @ torch.diag(std**2) @ q.T, atol=0.08, rtol=0)
    torch.testing.assert_close(full.mean, torch.ones(3, dtype=F64), atol=0.05, rtol=0)
    assert abs(full.scale - 2.0) < 0.05
    diag = data_moments(x.reshape(20000, 3, 1), full=False)
    assert diag.eigvecs is None and diag.mean.shape == (3, 1)
    torch.testing.assert_close(diag.eigvals, torch.diag(cov), atol=1e-12, rtol=1e-9)


def test_moments_round_trip_and_bad_files(tmp_path):
    m = data_moments(torch.randn(64, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(6)))
    back = GaussianMoments.load(m.save(tmp_path / "m.safetensors"))
    assert torch.equal(back.mean, m.mean) and torch.equal(back.eigvecs, m.eigvecs)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        GaussianMoments.load(bad)
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"mean": torch.zeros(2, dtype=F64), "eigvals": torch.ones(3, dtype=F64)},
              str(wrong))
    with pytest.raises(ValueError, match="wrong.safetensors: eigvals"):
        GaussianMoments.load(wrong)


def test_invalid_inputs():
    p = make_process("cosine")
    m = GaussianMoments(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="eigvals"):
        GaussianMoments(torch.zeros(2, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=">= 0"):
        GaussianMoments(torch.zeros(2, dtype=F64), -torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="factor"):
        skip_level(m, 0.0)
    with pytest.raises(ValueError, match="draws"):
        data_moments(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        data_moments(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]))
    with pytest.raises(ValueError, match="alpha > 0"):
        teleport(make_process("linear", zero_terminal_snr=True), torch.zeros(1, 2, dtype=F64),
                 500.0, 1000.0, m)
    assert p is not None


def test_difflab_moments_then_sample_with_gaussian_head(tmp_path):
    """``difflab moments`` writes the mean and covariance of a toy model's samples; ``sample
    --gaussian-head`` reads such a file (here of unit scale, as the data's: the 2-step toy
    model's own samples are far from it). With a skip level above the grid's top it is plain
    sampling bit for bit; with the default one its top level (sigma~ = 157) is answered by the
    Gaussian (different samples, still finite). A missing or mismatched moments file is a
    one-line error (exit status 2), and an existing output is refused."""
    import numpy as np
    from conftest import train_toy_moons

    from difflab.cli.main import main

    run = tmp_path / "toy"
    train_toy_moons(run)
    path = tmp_path / "m.safetensors"
    cmd = ["moments", "--checkpoint", str(run), "--out", str(path), "--draws", "64",
           "--sampler", "ddim", "--sample-steps", "4", "--device", "cpu"]
    assert main(cmd) == 0
    moments = GaussianMoments.load(path)
    assert moments.mean.shape == (2,) and moments.eigvecs.shape == (2, 2)
    assert main(cmd) == 2  # exists: refused without --overwrite
    path = GaussianMoments(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)).save(
        tmp_path / "unit.safetensors")

    def draw(name, *extra):
        npz = tmp_path / f"{name}.npz"
        assert main(["sample", "--checkpoint", str(run), "--n", "8", "--steps", "6",
                     "--sampler", "unipc_bh2", "--out", str(tmp_path / f"{name}.png"),
                     "--save-npz", str(npz), "--no-progress", *extra]) == 0
        return np.load(npz)["images"]

    plain = draw("plain")
    assert np.array_equal(draw("far", "--gaussian-head", str(path), "--skip-factor", "1e9"),
                          plain)
    head = draw("head", "--gaussian-head", str(path))
    assert np.isfinite(head).all() and not np.array_equal(head, plain)
    other = tmp_path / "other.safetensors"
    GaussianMoments(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)).save(other)
    for bad, extra in ((tmp_path / "none.safetensors", []), (other, []),
                       (path, ["--skip-factor", "0"])):
        assert main(["sample", "--checkpoint", str(run), "--n", "2", "--steps", "4",
                     "--gaussian-head", str(bad), "--out", str(tmp_path / "x.png"),
                     "--no-progress", *extra]) == 2
    assert not (tmp_path / "x.png").exists()
