"""Training objectives: weighting equivalences, VLB terms against Monte Carlo and the closed
form on Gaussian data, importance sampling, learned-variance sampling, EDM preconditioning."""

import math

import pytest
import torch
from torch import nn

from difflab.analytic import GaussianData
from difflab.evaluation.likelihood import normal_kl, posterior, vlb_term
from difflab.objectives import (
    HybridObjective,
    ImportanceSampler,
    SimpleObjective,
    lognormal_times,
    simple_loss,
    vlb_loss,
)
from difflab.objectives.vlb import vlb_term_from_prediction
from difflab.objectives.weighting import loss_weight
from difflab.parameterization import (
    EDM_NOISE_SCALE,
    Denoiser,
    Prediction,
    edm_coefficients,
    output_from_prediction,
)
from difflab.process import VPSDE, DiscreteProcess, VEProcess, q_sample
from difflab.samplers import ddim, ddpm, heun, time_grid

pytestmark = pytest.mark.usefixtures("one_thread")


class PointNet(nn.Module):
    """net(x, c_noise, cond) for [B, C] data: a small MLP on (x, sin/cos of c_noise)."""

    def __init__(self, dim: int = 3, out: int | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.f = nn.Sequential(nn.Linear(dim + 2, 32), nn.SiLU(), nn.Linear(32, out or dim))

    def forward(self, x, c_noise, cond=None):
        c = c_noise.reshape(-1, 1).expand(x.shape[0], 1) / 1000
        return self.f(torch.cat([x, torch.sin(c), torch.cos(c)], 1))


class WithVarFrac:
    """The exact denoiser of ``data`` with a constant learned-variance fraction ``v``."""

    def __init__(self, data, v: float):
        self.data, self.process, self.v = data, data.process, v

    def __call__(self, x, t, cond=None):
        p = self.data(x, t)
        return Prediction(p.x0, p.eps, torch.full_like(x, self.v))


def test_weighting_equivalences_between_loss_spaces():
    """|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2 and |v - v_hat|^2 = (1 + SNR) |x0 - x0_hat|^2
    for any prediction, and a weighting gives the same loss whatever space it is measured in."""
    g = torch.Generator().manual_seed(0)
    process = DiscreteProcess("cosine", T=1000)
    x0, noise = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(
        64, 3, generator=g, dtype=torch.float64)
    t = process.sample_t(64, g)
    alpha, sigma = process.alpha_sigma(t)
    x_t = q_sample(process, x0, t, noise)
    x0_hat = torch.randn(64, 3, generator=g, dtype=torch.float64)
    a, s = alpha[:, None], sigma[:, None]
    pred = Prediction(x0=x0_hat, eps=(x_t - a * x0_hat) / s)
    true = Prediction(x0=x0, eps=noise)
    mse = {k: (output_from_prediction(pred, alpha, sigma, k)
               - output_from_prediction(true, alpha, sigma, k)).pow(2).mean(1)
           for k in ("eps", "x0", "v")}
    snr = process.snr(t)
    torch.testing.assert_close(mse["eps"], snr * mse["x0"], rtol=1e-9, atol=0)
    torch.testing.assert_close(mse["v"], (1 + snr) * mse["x0"], rtol=1e-9, atol=0)
    lam = process.log_snr(t)
    closed = {"snr": snr, "min_snr": snr.clamp(max=5.0), "truncated_snr": snr.clamp(min=1.0),
              "edm": snr + 1 / 0.5**2}
    for name, w_x in closed.items():
        for space in ("eps", "x0", "v"):
            torch.testing.assert_close(mse[space] * loss_weight(lam, name, space),
                                       w_x * mse["x0"], rtol=1e-9, atol=0)
    assert torch.equal(loss_weight(lam, "constant", "v"), torch.ones_like(lam))


def test_simple_loss_weighting_matches_closed_form_on_a_network():
    process = DiscreteProcess("cosine", T=1000)
    den = Denoiser(PointNet().double(), process, "v")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(32, 3, generator=g, dtype=torch.float64)
    t, noise = process.sample_t(32, g), torch.randn(32, 3, generator=g, dtype=torch.float64)
    x_loss = simple_loss(den, x0, t=t, noise=noise, space="x0").loss
    for space in ("eps", "x0", "v"):
        out = simple_loss(den, x0, t=t, noise=noise, space=space, weighting="min_snr",
                          min_snr_gamma=2.0).loss
        torch.testing.assert_close(out, process.snr(t).clamp(max=2.0) * x_loss)


def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(2)
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([-0.2, 0.5])
    lv1, lv2 = torch.tensor([-1.0, 0.4]), torch.tensor([0.2, -0.3])
    z = torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    x = m1 + (0.5 * lv1).exp() * z

    def logp(x, m, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / lv.exp())
    mc = (logp(x, m1, lv1) - logp(x, m2, lv2)).mean(0)
    torch.testing.assert_close(mc.float(), normal_kl(m1, lv1, m2, lv2), rtol=0.01, atol=2e-3)


def test_vlb_kl_term_with_learned_variance_matches_monte_carlo():
    """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with Sigma_theta from v."""
    process = DiscreteProcess("linear", T=50)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, generator=g, dtype=torch.float64), torch.randn(
        1, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([7.0], dtype=torch.float64)
    x_t = q_sample(process, x0, t, noise)
    v = torch.tensor([[0.0, 0.3, 0.7, 1.0]], dtype=torch.float64)
    pred = Prediction(x0=x0 + 0.2, eps=noise, var_frac=v)
    term = vlb_term_from_prediction(process, x0, x_t, t, pred)
    post = posterior(process, t)
    mq, vq = post.mean(x0, x_t), post.var
    mp = post.mean(pred.x0, x_t)
    log_vp = v * post.beta.log() + (1 - v) * post.var.log()
    z = torch.randn(400_000, 4, generator=g, dtype=torch.float64)
    xs = mq + vq.sqrt() * z
    log_q = -0.5 * (vq.log() + (xs - mq) ** 2 / vq)
    log_p = -0.5 * (log_vp + (xs - mp) ** 2 / log_vp.exp())
    mc = (log_q - log_p).sum(1)
    assert abs(float(mc.mean()) - float(term)) < 4 * float(mc.std()) / math.sqrt(len(mc))


def test_vlb_term_agrees_with_the_likelihood_evaluator_at_v_0_and_1():
    process = DiscreteProcess("cosine", T=100)
    gd = GaussianData(process, torch.zeros(3), torch.full((3,), 0.4))
    g = torch.Generator().manual_seed(4)
    x0 = gd.sample(16, g).clamp(-1, 1)
    noise = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.randint(1, 101, (16,), generator=g).double()

    for v, variance in ((0.0, "beta_tilde"), (1.0, "beta")):
        _, term = vlb_loss(WithVarFrac(gd, v), x0, t, noise)
        ref = vlb_term(gd, x0, t, noise, variance=variance)
        torch.testing.assert_close(term, ref)


def closed_form_bound(process, mu, std):
    """E_x0 of L_T + sum_{t>=2} L_{t-1} + L_0 for x0 ~ N(mu, std^2), the exact denoiser,
    fixed variance beta_tilde (beta_tilde_2 at t = 1) and the Gaussian decoder, in nats."""
    T = process.T
    ab = process.alpha_bar
    aT2, sT2 = ab[-1], 1 - ab[-1]
    total = 0.5 * (aT2 * (mu**2 + std**2) + sT2 - 1 - sT2.log()).sum()
    for t in range(1, T + 1):
        a2, s2 = ab[t - 1], 1 - ab[t - 1]
        post_var_x0 = std**2 * s2 / (a2 * std**2 + s2)  # Var(x0 | x_t)
        post = posterior(process, torch.tensor([float(t)], dtype=torch.float64))
        if t == 1:
            var = posterior(process, torch.tensor([2.0], dtype=torch.float64)).var
            total += 0.5 * (torch.log(2 * math.pi * var) + post_var_x0 / var).sum()
        else:  # same variances: only the mean gap coef_x0 (x0 - x0_hat) remains
            total += 0.5 * (post.coef_x0**2 * post_var_x0 / post.var).sum()
    return float(total)


def test_vlb_loss_on_gaussian_data_equals_the_closed_form_bound():
    process = DiscreteProcess("cosine", T=40)
    mu, std = torch.tensor([0.2, -0.3, 0.0]), torch.tensor([0.5, 0.3, 0.8])
    gd = GaussianData(process, mu, std)
    g = torch.Generator().manual_seed(5)
    n, T = 10000, 40
    x0 = gd.sample(n, g).repeat(T, 1)
    t = torch.arange(1, T + 1).double().repeat_interleave(n)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    bound, term = vlb_loss(gd, x0, t, noise, decoder="gaussian")
    # every t has n examples: the mean of bound * dims is L_T + sum_t mean(term(t)) exactly
    est = float(bound.mean()) * 3
    term = term.reshape(T, n)
    assert abs(est - (float(term.mean(1).sum()) + float((bound * 3 - T * term.flatten())
                                                         .mean()))) < 1e-9
    exact = closed_form_bound(process, gd.mu, gd.std)
    se = math.sqrt(float(term.var(1).sum()) / n)  # stratified standard error
    assert abs(est - exact) < 4 * se + 1e-3 * abs(exact), (est, exact, se)
    assert se < 0.01 * abs(exact)


def test_importance_sampler_is_unbiased_and_follows_the_loss_history():
    T = 20
    sampler = ImportanceSampler(T, history=3)
    losses = 1.0 / torch.arange(1, T + 1, dtype=torch.float64)
    ts = torch.arange(1, T + 1).repeat(3)
    assert torch.allclose(sampler.probs(), torch.full((T,), 1 / T, dtype=torch.float64))
    sampler.update(ts, losses[ts - 1])
    p = sampler.probs()
    expect = losses / losses.sum() * (1 - 0.001) + 0.001 / T
    torch.testing.assert_close(p, expect)
    t, w = sampler.sample(200_000, torch.Generator().manual_seed(6))
    est = w * losses[t.long() - 1]
    assert abs(float(est.mean()) - float(losses.mean())) < 4 * float(est.std()) / 200_000**0.5
    # exactly: E_p[w L] = sum_t p_t L_t / (T p_t) = mean_t L_t
    torch.testing.assert_close((p * losses / (T * p)).sum(), losses.mean())


def test_ddpm_learned_variance_at_the_ends_is_beta_and_beta_tilde():
    process = DiscreteProcess("cosine", T=100)
    gd = GaussianData(process, torch.zeros(3), torch.full((3,), 0.5))

    ts = time_grid(process, 10)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for v, variance in ((0.0, "beta_tilde"), (1.0, "beta")):
        a = ddpm(WithVarFrac(gd, v), x, ts, torch.Generator().manual_seed(8))
        b = ddpm(gd, x, ts, torch.Generator().manual_seed(8), variance=variance)
        torch.testing.assert_close(a, b)


def test_hybrid_vlb_term_trains_only_the_variance_channels():
    process = DiscreteProcess("cosine", T=100)
    net = PointNet(out=6).double()
    den = Denoiser(net, process, "eps", learned_variance=True)
    g = torch.Generator().manual_seed(9)
    x0 = torch.rand(16, 3, generator=g, dtype=torch.float64) * 2 - 1
    t, noise = process.sample_t(16, g), torch.randn(16, 3, generator=g, dtype=torch.float64)
    raw = den.raw(q_sample(process, x0, t, noise), t).detach().requires_grad_(True)
    bound, _ = vlb_loss(den, x0, t, noise, stop_grad_mean=True, raw=raw)
    bound.sum().backward()
    assert torch.all(raw.grad[:, :3] == 0) and raw.grad[:, 3:].abs().sum() > 0
    out = HybridObjective().loss(den, x0, None, t, noise)
    assert out.loss.shape == (16,) and torch.isfinite(out.loss).all()


def test_edm_preconditioning_reduces_to_karras_on_a_ve_process():
    s = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    skip, c_out, c_in = edm_coefficients(torch.ones_like(s), s, 0.5)
    torch.testing.assert_close(skip, 0.25 / (s**2 + 0.25))
    torch.testing.assert_close(c_out, s * 0.5 / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + 0.25).sqrt())


class OracleF(nn.Module):
    """The F that makes the EDM denoiser exact for Gaussian data: recovers x_t and the noise
    level from (c_in x~, c_noise), then F = (D_exact - c_skip x~) / c_out."""

    def __init__(self, gd, sigma_data=0.5):
        super().__init__()
        self.gd, self.sd = gd, sigma_data
        self.dummy = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x_in, c_noise, cond=None):
        s = torch.exp(4 * c_noise.double() / EDM_NOISE_SCALE)  # c_noise = ln(s) / 4, scaled
        x = x_in * (s**2 + self.sd**2).sqrt()[:, None]   # VE: alpha = 1, x~ = x_t
        skip, c_out, _ = edm_coefficients(torch.ones_like(s), s, self.sd)
        return (self.gd(x, s).x0 - skip[:, None] * x) / c_out[:, None]


def test_edm_denoiser_on_ve_process_is_exact_and_samplers_converge():
    process = VEProcess(80.0)
    gd = GaussianData(process, torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.2]))
    den = Denoiser(OracleF(gd), process, "edm")
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    t = torch.full((16,), 2.5, dtype=torch.float64)
    torch.testing.assert_close(den(x, t).x0, gd(x, t).x0)
    for sampler, order in ((heun, 2), (ddim, 1)):
        errs = []
        for n in (8, 16, 32):
            ts = time_grid(process, n, "karras", sigma_min=0.02)
            x_T = 80.0 * x
            exact = gd.ode_solution(x_T, ts[0], ts[-2])
            # compare the state at the last noisy level (the last step returns x0_hat)
            states: list[torch.Tensor] = []
            sampler(den, x_T, ts, callback=lambda info, out=states: out.append(info.x))
            errs.append(float((states[-2] - exact).abs().max()))
        slope = math.log2(errs[0] / errs[2]) / 2
        assert slope > order - 0.3, (sampler.__name__, errs)


def test_lognormal_times_give_log_normal_noise_levels():
    g = torch.Generator().manual_seed(11)
    for process in (VEProcess(1000.0), VPSDE(), DiscreteProcess("cosine", T=1000)):
        t = lognormal_times(process, 20_000, g)
        lam = process.log_snr(t)
        ln_s = -0.5 * lam
        inside = (ln_s > -3) & (ln_s < 0.5)  # where no process clamps the range
        assert abs(float(ln_s[inside].median()) + 1.2) < 0.1
    t = SimpleObjective(time_sampling="continuous").sample_t(
        DiscreteProcess("cosine", T=100), 1000, g, "cpu")[0]
    assert (t != t.round()).any() and float(t.min()) > 0 and float(t.max()) <= 100
