"""Rectified flow: the linear-interpolation process, velocity ("flow") prediction, the
``rectified-flow`` objective, and every sampler on it against the exact Gaussian mixture."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab.analytic import GaussianData, GaussianMixture, sliced_wasserstein
from difflab.evaluation import ode_nll
from difflab.objectives import (
    OBJECTIVES,
    ObjectiveConfig,
    RectifiedFlowObjective,
    build_objective,
    logit_normal_times,
    velocity_loss,
)
from difflab.parameterization import (
    Denoiser,
    Prediction,
    output_from_prediction,
    prediction_from_output,
)
from difflab.process import (
    PROCESS_NAMES,
    Process,
    RectifiedFlow,
    make_process,
    process_from_config,
    q_sample,
)
from difflab.recipes.config import TrainConfig
from difflab.samplers import ODE_SAMPLERS, SAMPLERS, ddim, ddpm, euler_maruyama, time_grid

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def test_process_closed_forms_and_exact_ends():
    p = make_process("rectified_flow")
    assert isinstance(p, RectifiedFlow) and "rectified_flow" in PROCESS_NAMES
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=F64)
    a, s = p.alpha_sigma(t)
    assert torch.equal(a, 1 - t) and torch.equal(s, t)
    assert float(p.alpha(1.0)) == 0.0 and float(p.sigma(0.0)) == 0.0
    lam = p.log_snr(t)
    assert lam[0] == math.inf and lam[-1] == -math.inf
    assert torch.allclose(lam[1:-1], (a[1:-1] ** 2 / s[1:-1] ** 2).log())
    assert torch.allclose(p.t_from_log_snr(lam), t, atol=1e-15)        # exact inverse, ends too
    ra, rs = p.rates_from_log_snr(lam)
    assert torch.allclose(ra, a, atol=1e-15) and torch.allclose(rs, s, atol=1e-15)
    assert torch.allclose(p.c_noise(t), 1000 * t)


def test_derivatives_match_finite_differences():
    """alpha_sigma_dt is (-1, 1), as the base class's central differences find;
    d log alpha / d lambda matches a central difference of log alpha in lambda."""
    p = make_process("rectified_flow")
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    for mine, generic in zip(p.alpha_sigma_dt(t), Process.alpha_sigma_dt(p, t), strict=True):
        assert torch.allclose(mine, generic)
    lam, h = p.log_snr(t), 1e-5
    for q in (p, make_process("vpsde"), make_process("ve")):  # sigma / 2, sigma^2 / 2, 0
        log_a = [q.rates_from_log_snr(lam + d)[0].log() for d in (h, -h)]
        assert torch.allclose(q.log_alpha_slope(lam), (log_a[0] - log_a[1]) / (2 * h), atol=1e-8)


def test_config_round_trip_and_bad_options():
    p = make_process("rectified_flow")
    q = process_from_config(p.to_config())
    assert isinstance(q, RectifiedFlow) and q.to_config() == p.to_config()
    with pytest.raises(ValueError, match="already ends at zero SNR"):
        make_process("rectified_flow", zero_terminal_snr=True)


def test_q_sample_is_the_linear_interpolation():
    p = make_process("rectified_flow")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.7, 1.0], dtype=F64)
    assert torch.allclose(q_sample(p, x0, t, eps), (1 - t[:, None]) * x0 + t[:, None] * eps)


@pytest.mark.parametrize("name", ["rectified_flow", "vpsde", "cosine_rates"])
def test_flow_prediction_round_trips(name):
    """u = alpha' x0 + sigma' eps and back, exactly on the linear path (u = eps - x0) and
    through the process's time derivatives on VP paths."""
    p = make_process(name)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    t = torch.linspace(0.05, 0.95, 6, dtype=F64)
    a, s = p.alpha_sigma(t)
    rates_dt = p.alpha_sigma_dt(t)
    x_t = q_sample(p, x0, t, eps)
    u = output_from_prediction(Prediction(x0=x0, eps=eps), a, s, "flow", rates_dt)
    if name == "rectified_flow":
        assert torch.allclose(u, eps - x0, atol=1e-14)
    back = prediction_from_output(u, x_t, a, s, "flow", rates_dt=rates_dt)
    assert torch.allclose(back.x0, x0, atol=1e-10) and torch.allclose(back.eps, eps, atol=1e-10)


def test_flow_prediction_without_derivatives_is_the_linear_path_only():
    p = make_process("rectified_flow")
    t = torch.tensor([0.3], dtype=F64)
    x, u = torch.ones(1, 2, dtype=F64), torch.full((1, 2), 2.0, dtype=F64)
    pred = prediction_from_output(u, x, *p.alpha_sigma(t), "flow")
    assert torch.allclose(pred.x0, x - 0.3 * u) and torch.allclose(pred.eps, x + 0.7 * u)
    with pytest.raises(ValueError, match="rates_dt"):
        prediction_from_output(u, x, *make_process("vpsde").alpha_sigma(t), "flow")


class PointVelocity(nn.Module):
    """The exact velocity field of data at the single point ``x_star``: the noise of x_t is
    (x_t - (1 - t) x_star) / t, so u = (x_t - x_star) / t (Liu et al. 2022: straight paths)."""

    def __init__(self, x_star):
        super().__init__()
        self.x_star = nn.Parameter(x_star.clone())

    def forward(self, x, c_noise, cond=None):
        t = (c_noise.to(x.dtype) / 1000).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - self.x_star) / t


def test_velocity_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    p = make_process("rectified_flow")
    x_star = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    d = Denoiser(PointVelocity(x_star).double(), p, "flow")
    g = torch.Generator().manual_seed(2)
    t = p.sample_t(16, g)
    noise = torch.randn(16, 3, generator=g, dtype=F64)
    x0 = x_star.expand(16, 3)
    with torch.no_grad():  # (the network sees t through float32 c_noise: error ~1e-7)
        assert float(velocity_loss(d, x0, None, t, noise).max()) < 1e-12
        # data moved by 0.1: the net's u is off by 0.1 (1 - t) / t + 0.1 = 0.1 / t
        assert velocity_loss(d, x0 + 0.1, None, t, noise).tolist() == pytest.approx(
            (0.01 / t**2).tolist(), rel=1e-5)
    # the Denoiser of that net is the exact denoiser: x0_hat = x_star everywhere
    x_t = q_sample(p, x0, t, noise)
    with torch.no_grad():
        pred = d(x_t, t)
    assert torch.allclose(pred.x0, x0, atol=1e-6) and torch.allclose(pred.eps, noise, atol=1e-6)


def test_objective_registry_times_and_checks():
    assert OBJECTIVES["rectified-flow"] is RectifiedFlowObjective
    obj = build_objective(ObjectiveConfig(name="rectified-flow", time_sampling="logit_normal",
                                          logit_mean=0.5, logit_std=2.0))
    assert (obj.times, obj.logit_mean, obj.logit_std) == ("logit_normal", 0.5, 2.0)
    p = make_process("rectified_flow")
    obj.check(p, "flow")
    t, w = obj.sample_t(p, 20000, torch.Generator().manual_seed(0), "cpu")
    assert w is None and bool(((t > 0) & (t < 1)).all())
    logit = (t / (1 - t)).log()  # logit(t) ~ N(0.5, 2^2)
    assert abs(float(logit.mean()) - 0.5) < 0.05 and abs(float(logit.std()) - 2.0) < 0.05
    assert torch.equal(logit_normal_times(p, 5, torch.Generator().manual_seed(3)),
                       torch.sigmoid(torch.randn(5, generator=torch.Generator().manual_seed(3),
                                                 dtype=F64)))
    uniform = build_objective(ObjectiveConfig(name="rectified-flow"))
    assert uniform.times == "uniform"
    with pytest.raises(ValueError, match="--schedule rectified_flow"):
        uniform.check(make_process("cosine"), "flow")
    with pytest.raises(ValueError, match="--prediction flow"):
        uniform.check(p, "eps")
    with pytest.raises(ValueError, match="rectified-flow"):
        build_objective(ObjectiveConfig(name="simple")).check(p, "flow")
    with pytest.raises(ValueError, match="logit_normal"):
        build_objective(ObjectiveConfig(time_sampling="logit_normal")).check(p, "eps")
    with pytest.raises(ValueError, match="--time-sampling"):
        build_objective(ObjectiveConfig(name="rectified-flow",
                                        time_sampling="lognormal")).check(p, "flow")


def test_objective_sets_schedule_and_prediction_when_not_given():
    notes: list[str] = []
    cfg = TrainConfig.from_values({"objective": "rectified-flow"}, notes=notes)
    assert (cfg.diffusion.schedule, cfg.diffusion.prediction) == ("rectified_flow", "flow")
    assert any("--schedule rectified_flow" in n for n in notes)
    assert any("--prediction flow" in n for n in notes)
    given = TrainConfig.from_values({"objective": "rectified-flow", "schedule": "cosine"})
    assert (given.diffusion.schedule, given.diffusion.prediction) == ("cosine", "flow")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    plain = TrainConfig.from_values({})
    assert (plain.diffusion.schedule, plain.diffusion.prediction) == ("cosine", "eps")


# ---- samplers on the flow process, driven by the exact Gaussian-mixture denoiser ----

def mixture(dim=3):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, dim, generator=g, dtype=F64)
    return GaussianMixture(make_process("rectified_flow"), mu,
                           torch.tensor([0.4, 0.6], dtype=F64))


_REFERENCE = {}


def reference():
    """x_1 ~ N(0, I) and the exact PF-ODE map to t = 0 (DOP853 in t, float64)."""
    if not _REFERENCE:
        data = mixture()
        x1 = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
        _REFERENCE["v"] = (data, x1, data.ode_solution(x1, 1.0, 0.0))
    return _REFERENCE["v"]


def test_reference_is_the_exact_map_on_gaussian_data():
    """The t-integration used from pure noise agrees with the closed-form Gaussian ODE map."""
    p = make_process("rectified_flow")
    mu, std = torch.tensor([0.3, -0.5], dtype=F64), torch.tensor([0.4, 1.3], dtype=F64)
    gauss = GaussianData(p, mu, std)
    mix = GaussianMixture(p, mu[None], std[None])
    x1 = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.allclose(gauss.ode_solution(x1, 1.0, 0.0), mu + std * x1)
    assert torch.allclose(mix.ode_solution(x1, 1.0, 0.0), mu + std * x1, atol=1e-8)
    assert torch.allclose(mix.ode_solution(x1, 1.0, 0.3), gauss.ode_solution(x1, 1.0, 0.3),
                          atol=1e-8)


#: error bound at 64 uniform steps (first order: ddim = euler); Euler in lambda (euler_ode) is the
#: slowest on t-uniform grids
BOUND_64 = {"ddim": 0.02, "euler": 0.02, "euler_ode": 0.03}


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_every_ode_sampler_converges_on_the_flow(name):
    """Error to the exact PF-ODE solution falls as the uniform grid is refined and is small at
    64 steps (1e-2 for the first-order samplers, 2e-3 for the others)."""
    data, x1, exact = reference()
    p = data.process
    errs = [float((SAMPLERS[name](data, x1, time_grid(p, n)) - exact).pow(2).mean().sqrt())
            for n in (16, 32, 64)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < BOUND_64.get(name, 2e-3), errs


def test_high_order_samplers_are_high_order():
    """On the flow, Heun and the multistep solvers beat first order: the error falls by more
    than 2.5x per doubling of the steps."""
    data, x1, exact = reference()
    for name in ("heun", "dpm_solver", "plms"):
        errs = [float((SAMPLERS[name](data, x1, time_grid(data.process, n)) - exact)
                      .pow(2).mean().sqrt()) for n in (16, 32, 64)]
        slope = np.polyfit(np.log([16, 32, 64]), np.log(errs), 1)[0]
        assert slope < -1.3, (name, errs, slope)


@pytest.mark.parametrize("sampler,steps", [(ddpm, 100), (euler_maruyama, 200)],
                         ids=["ddpm", "euler_maruyama"])
def test_stochastic_samplers_reproduce_the_mixture(sampler, steps):
    data = GaussianMixture(make_process("rectified_flow"),
                           torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64),
                           torch.tensor([0.3, 0.2], dtype=F64))
    n, g = 2000, torch.Generator().manual_seed(1)
    out = sampler(data, torch.randn(n, 2, generator=g, dtype=F64),
                  time_grid(data.process, steps), g)
    sw = sliced_wasserstein(out, data.sample(n, torch.Generator().manual_seed(9)), 64,
                            torch.Generator().manual_seed(0))
    base = sliced_wasserstein(data.sample(n, torch.Generator().manual_seed(5)),
                              data.sample(n, torch.Generator().manual_seed(6)), 64,
                              torch.Generator().manual_seed(0))
    assert sw < 2 * base, (sw, base)


@pytest.mark.parametrize("name", ODE_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_straight_paths_are_exact_in_few_steps(name, steps):
    """Data at a single point: every path x_t = (1 - t) x* + t eps is straight, so one Euler
    (= DDIM) step from t = 1 lands on x* exactly, and so does every ODE sampler."""
    x_star = torch.tensor([[0.7, -1.2, 0.1]], dtype=F64)
    data = GaussianMixture(make_process("rectified_flow"), x_star, torch.zeros(1, dtype=F64))
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    out = SAMPLERS[name](data, x1, time_grid(data.process, steps))
    assert torch.allclose(out, x_star.expand(4, 3), atol=1e-12, rtol=0), (out - x_star).abs().max()


def test_one_euler_step_is_ddim_on_the_linear_path():
    """x_s = x_t + (s - t) u(x_t) is DDIM's x_s = alpha_s x0_hat + sigma_s eps_hat: DDIM is
    the Euler method in t of rectified flow (Liu et al. 2022, eq. 2)."""
    data, x1, _ = reference()
    pred = data(x1, 1.0)
    u = -pred.x0 + pred.eps  # alpha' x0 + sigma' eps
    x_euler = x1 + (0.6 - 1.0) * u
    a, s = data.process.alpha_sigma(torch.tensor(0.6, dtype=F64))
    assert torch.allclose(x_euler, a * pred.x0 + s * pred.eps, atol=1e-14)
    seen = []
    ddim(data, x1, torch.tensor([1.0, 0.6, 0.0], dtype=F64), callback=seen.append)
    assert torch.allclose(seen[0].x, x_euler, atol=1e-14)


def test_curved_paths_are_not_exact_in_one_step():
    """The control of the straight-path test: with spread-out data one step misses."""
    data, x1, exact = reference()
    assert float((ddim(data, x1, time_grid(data.process, 1)) - exact).abs().max()) > 1e-2


def test_ode_likelihood_is_exact_on_the_flow():
    """The PF-ODE likelihood (drift k x - sigma eps / 2, k = sigma / 2 here) matches the
    closed-form density of Gaussian data."""
    mu = torch.tensor([0.3, -0.5, 0.1], dtype=F64)
    std = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    gauss = GaussianData(make_process("rectified_flow"), mu, std)
    x = gauss.sample(50, torch.Generator().manual_seed(0))
    res = ode_nll(gauss, x, trace="exact")
    exact = -torch.distributions.Normal(mu, std).log_prob(x).sum(1)
    assert float((res.nll - exact).abs().max()) < 0.03


class LinearClassifier(nn.Module):
    """logits = x W (time ignored); remembers its last input."""

    def __init__(self, dim: int = 3, classes: int = 2):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, classes, generator=torch.Generator()
                                          .manual_seed(0), dtype=F64))
        self.seen = None

    def forward(self, x, c_noise):
        self.seen = x.detach()
        return x @ self.w


def test_classifier_guidance_on_the_flow():
    """A classifier of another process sees x_t rescaled to its own process at the same SNR
    (x_c = (sigma_c / sigma) x_t: sqrt(2) at t = 1/2 for a VP classifier), the gradient is
    chained back, and guidance from pure noise (alpha = 0) stays finite."""
    from difflab.guidance import ClassifierGuidance, log_prob_grad

    data = mixture()
    clf = LinearClassifier()
    y = torch.tensor([0, 1, 1, 0])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    vp = make_process("vpsde")
    guided = ClassifierGuidance(data, clf, 2.0, classifier_process=vp)
    t = torch.full((4,), 0.5, dtype=F64)
    out = guided(x, t, y)
    assert torch.allclose(clf.seen, math.sqrt(2) * x)
    grad = math.sqrt(2) * log_prob_grad(clf, math.sqrt(2) * x, vp.c_noise(t), y)
    assert torch.allclose(out.eps, data(x, t).eps - 2.0 * 0.5 * grad)
    assert torch.allclose(out.x0, (x - 0.5 * out.eps) / 0.5)
    start = guided(x, torch.ones(4, dtype=F64), y)
    assert bool(torch.isfinite(start.x0).all() and torch.isfinite(start.eps).all())
    x_end = ddim(guided, x, time_grid(data.process, 4), cond=y)
    assert bool(torch.isfinite(x_end).all())


@pytest.mark.parametrize("method", ODE_SAMPLERS)
def test_inversion_to_pure_noise_round_trips(method):
    """ODE inversion up to t = 1 (alpha = 0; its last step is DDIM's, samplers.base
    .zero_snr_start) and reconstruction come back to the data, closer on finer grids."""
    from difflab.editing import ode_invert, reconstruct

    data = mixture()
    x0 = data.sample(4, torch.Generator().manual_seed(1))
    errs = []
    for n in (32, 64):
        ts = time_grid(data.process, n)
        x1 = ode_invert(data, x0, ts, method)
        assert bool(torch.isfinite(x1).all())
        errs.append(float((reconstruct(data, x1, ts, method) - x0).abs().max()))
    assert errs[1] < errs[0] and errs[1] < 0.07, errs
