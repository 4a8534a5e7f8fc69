"""Consistency models: the boundary condition holds exactly, the distillation target is one
step of the teacher's solver, the sampler's one step is f(x_T, T), the training curriculum,
and ``difflab distill consistency`` / ``--objective consistency-training`` end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_tiny_digits
from torch import nn

from difflab.analytic import GaussianMixture
from difflab.cli.main import main
from difflab.objectives.consistency import (
    boundary_sigma,
    boundary_time,
    consistency_distance,
    consistency_levels,
    curriculum_levels,
)
from difflab.parameterization import (
    Denoiser,
    Prediction,
    consistency_coefficients,
    edm_coefficients,
    noise_level,
)
from difflab.pipeline import Pipeline
from difflab.process import make_process
from difflab.recipes.distill.consistency import ConsistencyDistillationLoss, TargetNetwork
from difflab.samplers import SAMPLERS, consistency, time_grid


class RandomNet(nn.Module):
    """A fixed random function of (x, c_noise): F can be anything at the boundary."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))

    def forward(self, x, c_noise, cond=None):
        return torch.tanh(x @ self.w) * 3 + c_noise[:, None].to(x.dtype) / 100


@pytest.mark.parametrize("base", ["eps", "v", "x0", "edm"])
def test_boundary_condition_is_exact(base):
    torch.manual_seed(0)
    process = make_process("cosine", T=1000)
    s_min = boundary_sigma(process)
    den = Denoiser(RandomNet(), process, "consistency", base_prediction=base, sigma_min=s_min,
                   sigma_max=80.0)
    x = torch.randn(64, 2, dtype=torch.float64) * 5
    t = torch.full((64,), boundary_time(process), dtype=torch.float64)
    alpha = process.alpha(t)[:, None]
    assert torch.equal(den(x, t).x0, x / alpha)          # f(x, t_min) = x~, bit for bit
    c_skip, c_out = consistency_coefficients(torch.tensor([s_min, s_min / 2]), s_min, 0.5)
    assert c_skip.tolist() == [1.0, 1.0] and c_out.tolist() == [0.0, 0.0]
    # away from the boundary F matters
    assert not torch.allclose(den(x, t + 5).x0, x / process.alpha(t + 5)[:, None])


def test_coefficients_are_the_papers_and_edm_base_is_its_form():
    process = make_process("cosine", T=1000)
    s_min, sd = boundary_sigma(process), 0.5
    s = torch.tensor([0.01, 0.3, 1.0, 7.0, 60.0], dtype=torch.float64)
    c_skip, c_out = consistency_coefficients(s, s_min, sd)
    assert torch.allclose(c_skip, sd**2 / ((s - s_min) ** 2 + sd**2))
    assert torch.allclose(c_out, sd * (s - s_min) / (sd**2 + s**2).sqrt())
    # base edm: f = c_skip x~ + c_out F with F the raw output at EDM's inputs
    net = RandomNet()
    den = Denoiser(net, process, "consistency", base_prediction="edm", sigma_min=s_min)
    t = process.t_from_log_snr(-2 * s.log())
    x = torch.randn(5, 2, dtype=torch.float64)
    alpha, sigma = process.alpha_sigma(t)
    sl = noise_level(process, t)
    skip, out = consistency_coefficients(sl, s_min, sd)
    F = den.raw(x, t)
    _, _, c_in = edm_coefficients(alpha, sigma, sd)  # the input EDM's F saw
    assert torch.allclose(den(x, t).x0, skip[:, None] * x / alpha[:, None] + out[:, None] * F)
    assert c_in.shape == t.shape


def test_eps_student_starts_as_the_teachers_denoiser():
    """A student copied from an eps network: f = x0_teacher + O(s_min) terms."""
    process = make_process("cosine", T=1000)
    net = RandomNet()
    teacher = Denoiser(net, process, "eps")
    student = Denoiser(net, process, "consistency", base_prediction="eps",
                       sigma_min=boundary_sigma(process))
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 500.0, dtype=torch.float64)
    s_min, sd = student.sigma_min, 0.5
    s = float(noise_level(process, t)[0])
    skip_cm, skip_edm = sd**2 / ((s - s_min) ** 2 + sd**2), sd**2 / (s**2 + sd**2)
    x_ve, eps = x / process.alpha(t)[0], teacher(x, t).eps
    expected = x_ve * (skip_cm + (1 - s_min / s) * (1 - skip_edm)) - (s - s_min) * eps
    assert torch.allclose(student(x, t).x0, expected, atol=1e-12)
    diff = (student(x, t).x0 - teacher(x, t).x0).abs().max()  # x0_teacher = x~ - s eps
    assert 0 < diff < 20 * s_min


def test_noisier_inputs_are_evaluated_at_sigma_max():
    process = make_process("cosine", T=1000)
    den = Denoiser(RandomNet(), process, "consistency", base_prediction="eps",
                   sigma_min=boundary_sigma(process), sigma_max=80.0)
    x = torch.randn(4, 2, dtype=torch.float64)
    T = torch.full((4,), 1000.0, dtype=torch.float64)
    top = torch.full((4,), den.t_top, dtype=torch.float64)
    scaled = x * process.sigma(top)[0] / process.sigma(T)[0]
    assert torch.allclose(den(x, T).x0, den(scaled, top).x0, atol=1e-12)
    assert float(noise_level(process, top)[0]) == pytest.approx(80.0, rel=1e-9)


def mixture():
    process = make_process("cosine", T=1000)
    mu = torch.tensor([[-0.6, 0.2], [0.5, 0.5], [0.1, -0.7]])
    return process, GaussianMixture(process, mu, torch.tensor([0.2, 0.3, 0.25]))


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpm_solver"])
def test_distillation_target_is_one_step_of_the_teachers_sampler(solver):
    """x^_{t_n} equals the sampler's own step from t_{n+1} to t_n (exact mixture denoiser)."""
    process, mix = mixture()
    times = consistency_levels(process, 12)
    target = TargetNetwork(RandomNet(), 0.0)
    loss = ConsistencyDistillationLoss(mix, target, times, {"sigma_min": 0.01}, solver, "l2")
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([0, 3, 7, 10])
    t_hi, t_lo = times[n + 1], times[n]
    x_hi = torch.randn(4, 2, generator=g, dtype=torch.float64)
    x_lo = loss.teacher_step(x_hi, t_hi, t_lo)
    for i in range(4):
        grid = [t_hi[i], t_lo[i], 0.0]
        if solver == "dpm_solver":  # its interior grid point is the stage: the midpoint
            lam = process.log_snr(torch.stack([t_hi[i], t_lo[i]]))
            grid.insert(1, process.t_from_log_snr(lam.mean()))
        seen = []
        options = {"order": 2} if solver == "dpm_solver" else {}
        SAMPLERS[solver](mix, x_hi[i:i + 1], torch.tensor(grid, dtype=torch.float64),
                         callback=lambda info, seen=seen: seen.append(info.x), **options)
        assert torch.allclose(x_lo[i:i + 1], seen[0], rtol=1e-9, atol=1e-10), (solver, i)
    # at the top pair (s = 80 -> 49, the signal ~1% of x) every solver is nearly exact
    exact = mix.ode_solution(x_hi[3:], float(t_hi[3]), float(t_lo[3]))
    assert torch.allclose(x_lo[3:], exact, atol=1e-3)


def test_one_step_sampling_is_f_at_T_and_multistep_renoises():
    process = make_process("cosine", T=1000)
    den = Denoiser(RandomNet(), process, "consistency", base_prediction="eps",
                   sigma_min=boundary_sigma(process), sigma_max=80.0)
    x = torch.randn(6, 2, dtype=torch.float64)
    ts = time_grid(process, 1)
    assert torch.equal(consistency(den, x, ts), den(x, ts[0]).x0)
    # two steps: denoise at T, re-noise to t_1 with the generator's noise, denoise again
    ts = time_grid(process, 2)
    assert ts.tolist() == [1000.0, 500.0, 0.0]
    out = consistency(den, x, ts, torch.Generator().manual_seed(3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    a, s = process.alpha_sigma(ts[1])
    expected = den(a * den(x, ts[0]).x0 + s * z, ts[1]).x0
    assert torch.allclose(out, expected, atol=1e-12)


def test_curriculum_doubles_from_s0_to_s1():
    # K = 1000, s0 = 10, s1 = 1280: 8 stages of K' = 125 steps
    got = [curriculum_levels(k, 1000, 10, 1280) for k in (0, 124, 125, 250, 874, 875, 999)]
    assert got == [11, 11, 21, 41, 641, 1281, 1281]
    assert curriculum_levels(10**6, 1000, 10, 160) == 161
    with pytest.raises(ValueError):
        curriculum_levels(0, 10, 20, 10)


def test_levels_and_metric():
    process = make_process("cosine", T=1000)
    times = consistency_levels(process, 18)
    s = noise_level(process, times)
    assert times[0] == boundary_time(process) and float(s[0]) == boundary_sigma(process)
    assert float(s[-1]) == pytest.approx(80.0) and bool((s[1:] > s[:-1]).all())
    a, b = torch.zeros(2, 64), torch.full((2, 64), 0.5)
    c = 0.00054 * 8
    assert torch.allclose(consistency_distance(a, b), torch.full((2,), math.sqrt(16 + c * c) - c))
    assert torch.allclose(consistency_distance(a, b, "l2"), torch.full((2,), 0.25))


def test_distill_and_sample_end_to_end(tmp_path, capsys):
    train_tiny_digits(tmp_path, steps=2)
    out = tmp_path / "cm"
    assert main(["distill", "consistency", "--teacher", str(tmp_path / "run"), "--steps", "3",
                 "--batch-size", "8", "--num-scales", "6", "--out-dir", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    pipe = Pipeline.from_pretrained(out)
    st = pipe.stage
    assert (st.prediction, st.base_prediction, st.sampler, st.sampler_steps) == (
        "consistency", "v", "consistency", 1)
    assert st.sigma_min == boundary_sigma(pipe.process) and st.sigma_max == 80.0
    for k in (1, 2, 4):  # the pipeline at any number of steps
        assert pipe(2, labels=1, sampler="consistency", steps=k).samples.shape == (2, 1, 8, 8)
    capsys.readouterr()
    for steps in ("1", "2"):
        assert main(["sample", "--checkpoint", str(out), "--n", "2", "--class", "3",
                     "--sampler", "consistency", "--steps", steps, "--out",
                     str(tmp_path / f"g{steps}.png"), "--no-progress"]) == 0
        assert f"(consistency, {steps} step" in capsys.readouterr().out


def test_consistency_training_saves_a_consistency_model(tmp_path):
    train_tiny_digits(tmp_path, steps=3, objective="consistency-training", prediction="edm",
                      curriculum_start=2, curriculum_end=8)
    pipe = Pipeline.from_pretrained(tmp_path / "run")
    st = pipe.stage
    assert (st.prediction, st.base_prediction, st.sampler, st.sampler_steps) == (
        "consistency", "edm", "consistency", 1)
    x = pipe(3, labels=0, steps=2).samples
    assert x.shape == (3, 1, 8, 8) and bool(x.isfinite().all())


@pytest.mark.slow
def test_guided_distillation_takes_w_as_an_input(tmp_path):
    """Latent-consistency-style guidance: the student reads w; the target is the CFG teacher."""
    from difflab.recipes.config import OptimConfig
    from difflab.recipes.distill.base import distill_run
    from difflab.recipes.distill.consistency import ConsistencyConfig, build

    train_tiny_digits(tmp_path, steps=2)
    config = ConsistencyConfig(
        teacher=str(tmp_path / "run"), guided=True, w_min=1.0, w_max=3.0, num_scales=4,
        optim=OptimConfig(steps=2, batch_size=8, lr=1e-4, warmup_steps=0, ema_decay=0.9),
        run=distill_run("consistency", device="cpu", out_dir=str(tmp_path / "g"))())
    loop = build(config)
    # at initialisation (zero w embedding) the student at any w is the unguided student
    net = loop.loop.model
    x = torch.randn(2, 1, 8, 8)
    c = torch.full((2,), 500.0)
    from difflab.conditioning import GuidanceCond
    y = torch.tensor([1, 2])
    net.eval()  # no dropout
    a = net(x, c, GuidanceCond(y, torch.full((2,), 1.0)))
    b = net(x, c, GuidanceCond(y, torch.full((2,), 3.0)))
    assert torch.equal(a, b)
    net.train()
    loop.run(progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "g")
    assert pipe.stage.guidance_input and pipe.stage.guidance_range == [1.0, 3.0]
    assert pipe.stage.prediction == "consistency"
    one = pipe(2, labels=1, guidance=3.0).samples
    assert one.shape == (2, 1, 8, 8) and not torch.equal(one, pipe(2, labels=1).samples)


class GaussianFlowMap:
    """The exact consistency function of 1-D data N(mu, sd^2): the probability-flow ODE maps
    x~ = x_t / alpha at level s to mu + sd (x~ - mu) / sqrt(sd^2 + s^2)."""

    def __init__(self, process, mu: float, sd: float):
        self.process, self.mu, self.sd = process, mu, sd

    def __call__(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64)
        a, sig = (float(v) for v in self.process.alpha_sigma(t))
        s = sig / a
        x0 = self.mu + self.sd * (x / a - self.mu) / math.sqrt(self.sd**2 + s**2)
        return Prediction(x0=x0, eps=(x - a * x0) / sig)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_multistep_sampling_with_the_exact_flow_map_keeps_the_data_law(steps):
    """Algorithm 1 with the exact consistency function of Gaussian data draws exactly from
    N(mu, sd^2) at every number of steps: the re-noising must put x at the level the model is
    evaluated at (a wrong alpha, sigma or time there changes the law)."""
    process, mu, sd, n = make_process("cosine", T=1000), 0.3, 0.5, 200_000
    ts = time_grid(process, steps)
    ts[0] = 990.0  # alpha(T) = 0 would make x~ undefined; start from the exact marginal there
    g = torch.Generator().manual_seed(0)
    a, sig = (float(v) for v in process.alpha_sigma(ts[0]))
    x0 = mu + sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = a * x0 + sig * torch.randn(n, 1, generator=g, dtype=torch.float64)
    out = consistency(GaussianFlowMap(process, mu, sd), x, ts, g)
    assert abs(float(out.mean()) - mu) < 5 * sd / math.sqrt(n)
    assert abs(float(out.std()) / sd - 1) < 0.01
