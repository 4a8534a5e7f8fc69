"""CLD in closed form and gDDIM (Zhang, Tao & Chen 2023) against exact solutions.

- Psi(t, s) and Sigma_t against a tight numerical solve of the moment ODEs, gDDIM's R_t against
  its own matrix ODE dR/dt = (F + G G^T Sigma^{-1} / 2) R;
- the paper's key property: for one-point data one step with K = R lands on the probability-
  flow ODE solution, while CLD's Cholesky factor K = L does not;
- convergence at order q + 1 on an exact Gaussian-mixture CLD model;
- on a scalar VP process q = 0 is DDIM; q >= 1 converges at order q + 1 too;
- stochastic gDDIM (lambda > 0): the one-point-data transition keeps the marginal exactly, the
  sampler reproduces it in distribution, and on a VP process lambda = 1 is DDPM's posterior;
- bad input: a ValueError naming what is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from difflab.analytic import CLDGaussianMixture, GaussianMixture
from difflab.process import make_process
from difflab.process.cld import CLD, quadratic_grid
from difflab.samplers import ddim, ddpm, time_grid
from difflab.samplers.gddim import cld_stochastic_transition, gddim
from difflab.samplers.options import check_options, declared_options

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def moment_odes(process: CLD, s: float, ts: np.ndarray, sigma_s: np.ndarray) -> np.ndarray:
    """(Psi(t, s), Sigma_t) for t in ts by DOP853 on dPsi/dt = F Psi, dSigma/dt = F Sigma +
    Sigma F^T + G G^T from (I, sigma_s) at s; [len(ts), 8]."""
    f, gg = process.drift_matrix().numpy(), process.diffusion_matrix().numpy()

    def rhs(_t: float, y: np.ndarray) -> np.ndarray:
        psi, sig = y[:4].reshape(2, 2), y[4:].reshape(2, 2)
        return np.concatenate([(f @ psi).ravel(), (f @ sig + sig @ f.T + gg).ravel()])

    y0 = np.concatenate([np.eye(2).ravel(), sigma_s.ravel()])
    sol = solve_ivp(rhs, (s, float(ts[-1])), y0, t_eval=ts, method="DOP853", rtol=1e-13,
                    atol=1e-14)
    return sol.y.T


@pytest.mark.parametrize("params", [{}, {"beta": 2.0, "mass": 1.0, "gamma": 0.5}])
def test_closed_forms_match_the_moment_odes(params):
    process = CLD(**params)
    ts = np.array([1e-3, 0.02, 0.1, 0.35, 0.7, 1.0])
    sigma0 = np.diag([0.0, process.gamma * process.mass])
    ref = moment_odes(process, 0.0, ts, sigma0)
    t = torch.tensor(ts, dtype=F64)
    assert np.abs(process.transition(t, 0.0).reshape(-1, 4).numpy() - ref[:, :4]).max() < 1e-8
    assert np.abs(process.covariance(t).reshape(-1, 4).numpy() - ref[:, 4:]).max() < 1e-8
    # Psi(t, s) from s > 0, and backwards (t < s) as its inverse
    s = 0.3
    ref_s = moment_odes(process, s, ts[ts > s], process.covariance(s).numpy())
    psi = process.transition(torch.tensor(ts[ts > s]), s).reshape(-1, 4).numpy()
    assert np.abs(psi - ref_s[:, :4]).max() < 1e-8
    back = process.transition(s, 0.8) @ process.transition(0.8, s)
    assert torch.allclose(back, torch.eye(2, dtype=F64), atol=1e-12)
    # the exact limit: CLD's equilibrium diag(1, M)
    eq = torch.diag(torch.tensor([1.0, process.mass], dtype=F64))
    assert torch.allclose(process.covariance(200.0 / process.beta), eq, atol=1e-12)


def test_r_factor_solves_its_ode_and_factors_sigma():
    process = CLD()
    t = torch.tensor([0.01, 0.2, 0.6, 1.0], dtype=F64)
    r, chol = process.r_factor(t), process.cholesky(t)
    assert torch.allclose(r @ r.mT, process.covariance(t), atol=1e-12)
    assert torch.allclose(chol @ chol.mT, process.covariance(t), atol=1e-12)
    f, gg = process.drift_matrix().numpy(), process.diffusion_matrix().numpy()

    def rhs(tt: float, y: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(process.covariance(tt).numpy())
        return ((f + 0.5 * gg @ inv) @ y.reshape(2, 2)).ravel()

    t0, t1 = 0.05, 0.9
    sol = solve_ivp(rhs, (t0, t1), process.r_factor(t0).numpy().ravel(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    assert np.abs(sol.y[:, -1] - process.r_factor(t1).numpy().ravel()).max() < 1e-8
    # the Cholesky factor does not solve it: it is R up to a rotation that changes with t
    sol = solve_ivp(rhs, (t0, t1), process.cholesky(t0).numpy().ravel(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    assert np.abs(sol.y[:, -1] - process.cholesky(t1).numpy().ravel()).max() > 1e-2


@pytest.mark.parametrize("t,s", [(1.0, 0.01), (0.8, 0.3), (0.5, 0.45), (0.2, 0.001)])
def test_one_step_is_exact_for_one_point_data_with_r_not_with_cholesky(t, s):
    """gDDIM's Proposition: with K = R, eps is constant along the ODE of one-point data, so one
    step lands on the solution; with CLD's K = L, eps rotates and the step misses it."""
    process = CLD()
    dirac = CLDGaussianMixture(process, torch.tensor([[0.7, -1.3, 0.2]], dtype=F64), 0.0)
    u = dirac.sample_marginal(4, t, torch.Generator().manual_seed(1))
    ref = dirac.ode_solution(u, t, s)
    grid = torch.tensor([t, s], dtype=F64)
    err_r = (gddim(dirac, u, grid, factor="R") - ref).abs().max().item()
    err_l = (gddim(dirac, u, grid, factor="cholesky") - ref).abs().max().item()
    assert err_r < 1e-10 * max(1.0, ref.abs().max().item())
    assert err_l > 1e6 * err_r and err_l > 1e-2


def slope(ns: list[int], errs: list[float]) -> float:
    """Least-squares slope of log error against log step size (1 / n)."""
    return float(np.polyfit(-np.log(ns), np.log(errs), 1)[0])


@pytest.fixture(scope="module")
def cld_problem():
    process = CLD()
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 2, generator=g, dtype=F64)
    mix = CLDGaussianMixture(process, mu, torch.tensor([0.3, 0.2, 0.25], dtype=F64))
    u_t = mix.sample_marginal(8, process.t_max, g)
    return mix, u_t, mix.ode_solution(u_t, process.t_max, process.t_min)


@pytest.mark.parametrize("order,band", [(0, (0.8, 1.3)), (1, (1.6, 2.5)), (2, (2.3, 3.6))])
def test_cld_convergence_order(cld_problem, order, band):
    mix, u_t, ref = cld_problem
    ns = [40, 80, 160]
    errs = [(gddim(mix, u_t, quadratic_grid(mix.process, n), order=order) - ref)
            .pow(2).mean().sqrt().item() for n in ns]
    assert band[0] < slope(ns, errs) < band[1], errs
    assert errs[-1] < [3e-2, 5e-3, 1e-3][order]


def scalar_problem(name: str):
    """A 2-component mixture on a scalar process, 8 starting points and its 10-step grid."""
    process = make_process(name)
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(process, torch.randn(2, 3, generator=g, dtype=F64),
                          torch.tensor([0.4, 0.6], dtype=F64))
    return mix, torch.randn(8, 3, generator=g, dtype=F64), time_grid(process, 10)


@pytest.mark.parametrize("name,tol", [("vpsde", 1e-12), ("linear", 1e-12), ("cosine", 1e-11)])
def test_scalar_q0_is_ddim(name, tol):
    mix, x, ts = scalar_problem(name)
    seen_d, seen_g = [], []
    out_d = ddim(mix, x, ts, callback=lambda info: seen_d.append(info.x))
    out_g = gddim(mix, x, ts, callback=lambda info: seen_g.append(info.x))
    scale = max(1.0, max(v.abs().max().item() for v in seen_d))
    assert (out_d - out_g).abs().max().item() < tol * scale
    assert max((a - b).abs().max().item() for a, b in zip(seen_d, seen_g, strict=True)) \
        < tol * scale


@pytest.mark.parametrize("order,band", [(1, (1.6, 2.4)), (2, (2.5, 3.6))])
def test_scalar_multistep_order(order, band):
    """q >= 1 on a VP process: the exponential multistep in t (DEIS tAB) at order q + 1,
    measured at the last noisy level (the state before the final x0_hat)."""
    process = make_process("vpsde")
    g = torch.Generator().manual_seed(1)
    mix = GaussianMixture(process, torch.randn(2, 3, generator=g, dtype=F64),
                          torch.tensor([0.4, 0.6], dtype=F64))
    x = torch.randn(8, 3, generator=g, dtype=F64)
    t_end = 0.02
    ref = mix.ode_solution(x, 1.0, t_end)
    ns, errs = [20, 40, 80], []
    for n in ns:
        ts = torch.cat([torch.linspace(1.0, t_end, n + 1, dtype=F64), torch.zeros(1, dtype=F64)])
        states: list = []
        gddim(mix, x, ts, order=order, callback=states.append)
        errs.append((states[-2].x - ref).pow(2).mean().sqrt().item())
    assert band[0] < slope(ns, errs) < band[1], errs


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_stochastic_transition_keeps_the_marginal(lam):
    """Phi Sigma_t Phi^T + P = Sigma_s; at lambda = 0 it is the ODE's R_s R_t^{-1}, P = 0."""
    process = CLD()
    for t, s in [(1.0, 0.5), (0.3, 0.01), (0.05, 0.001)]:
        phi, p = cld_stochastic_transition(process, t, s, lam)
        sig_s = process.covariance(s)
        assert torch.allclose(phi @ process.covariance(t) @ phi.T + p, sig_s, atol=1e-9)
        assert torch.linalg.eigvalsh(p).min() > -1e-12
        if lam == 0:
            r_map = process.r_factor(s) @ torch.linalg.inv(process.r_factor(t))
            assert torch.allclose(phi, r_map, atol=1e-9) and p.abs().max() < 1e-12
        else:
            assert torch.linalg.eigvalsh(p).min() > 1e-8


def test_stochastic_gddim_samples_the_one_point_marginal():
    """From u_1 drawn exactly, lambda = 1 over three steps gives u ~ N(c x0, Sigma) at
    t = 0.05: the standardised draws have mean 0 and covariance I within 5 standard errors."""
    process = CLD()
    dirac = CLDGaussianMixture(process, torch.full((1, 500), 0.5, dtype=F64), 0.0)
    g = torch.Generator().manual_seed(4)
    u = dirac.sample_marginal(100, 1.0, g)
    out = gddim(dirac, u, torch.tensor([1.0, 0.6, 0.2, 0.05], dtype=F64), g, lam=1.0)
    v = out.permute(0, 2, 1).reshape(-1, 2)
    z = torch.linalg.solve(process.cholesky(0.05), (v - 0.5 * process.mean_coefficient(0.05)).T)
    n = z.shape[1]
    assert z.mean(1).abs().max() < 5 / math.sqrt(n)
    assert (torch.cov(z) - torch.eye(2, dtype=F64)).abs().max() < 5 * math.sqrt(2 / n)
    # and it is not the deterministic sampler
    assert (out - gddim(dirac, u, torch.tensor([1.0, 0.6, 0.2, 0.05], dtype=F64))).abs().max() > 0.1


@pytest.mark.parametrize("name", ["vpsde", "linear"])
def test_scalar_lambda_one_is_ddpm_posterior(name):
    mix, x, ts = scalar_problem(name)
    out_d = ddpm(mix, x, ts, torch.Generator().manual_seed(5), variance="beta_tilde")
    out_g = gddim(mix, x, ts, torch.Generator().manual_seed(5), lam=1.0)
    assert (out_d - out_g).abs().max().item() < 1e-12


def test_bad_input_names_the_problem():
    process = CLD()
    mix = CLDGaussianMixture(process, torch.zeros(1, 2, dtype=F64), 0.5)
    u = mix.sample_marginal(2, 1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        gddim(mix, u, torch.tensor([0.1, 0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"\[B, 2, \.\.\.\]"):
        gddim(mix, u[:, :1], quadratic_grid(process, 4))
    with pytest.raises(ValueError, match="Sigma_0 is singular"):
        gddim(mix, u, torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="t_max"):
        gddim(mix, u, torch.tensor([2.0, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="'order'"):
        gddim(mix, u, quadratic_grid(process, 4), order=3)
    with pytest.raises(ValueError, match="'factor'"):
        gddim(mix, u, quadratic_grid(process, 4), factor="symmetric")
    with pytest.raises(ValueError, match="'lam' > 0 .* needs order 0"):
        gddim(mix, u, quadratic_grid(process, 4), order=1, lam=0.5)
    with pytest.raises(ValueError, match="'lam' must be >= 0"):
        gddim(mix, u, quadratic_grid(process, 4), lam=-1.0)
    with pytest.raises(ValueError, match="gamma > 0"):
        CLD(gamma=0.0)
    declared = declared_options(gddim)
    assert check_options("gddim", declared, {"order": 2.0}) == {"order": 2}
    with pytest.raises(ValueError, match="option 'order' must be one of 0, 1, 2"):
        check_options("gddim", declared, {"order": 5})


def test_callback_reports_each_step_and_x0_hat_is_exact_at_the_data():
    """The callback sees every step; for one-point data x0_hat is the point at every step."""
    process = CLD()
    point = torch.tensor([[0.4, -0.9]], dtype=F64)
    dirac = CLDGaussianMixture(process, point, 0.0)
    u = dirac.sample_marginal(3, 1.0, torch.Generator().manual_seed(2))
    infos = []
    gddim(dirac, u, quadratic_grid(process, 5), callback=infos.append)
    assert [i.i for i in infos] == list(range(5))
    for info in infos:
        assert torch.allclose(info.x0, point.expand(3, 2), atol=1e-9)
    assert math.isclose(float(infos[0].t), process.t_max)


def test_zero_terminal_snr_start_is_ddim():
    """From alpha = 0 (zero terminal SNR) the first step is the exact DDIM step out of pure
    noise (``base.zero_snr_start``), so order 0 is still ddim, and orders 1, 2 stay finite."""
    vp = make_process("linear", zero_terminal_snr=True)
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(vp, torch.randn(2, 3, generator=g, dtype=F64),
                          torch.tensor([0.4, 0.6], dtype=F64))
    x = torch.randn(8, 3, generator=g, dtype=F64)
    ts = time_grid(vp, 10)
    assert float(vp.alpha(ts[0])) == 0
    torch.testing.assert_close(gddim(mix, x, ts), ddim(mix, x, ts), rtol=0, atol=1e-12)
    for order in (1, 2):
        assert torch.isfinite(gddim(mix, x, ts, order=order)).all()
