"""Reflow: the pairs are exactly the teacher's ODE map, the loss is the straight-path
velocity between them, and the student is an ordinary one-step flow pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import train_tiny_digits
from torch import nn

from difflab.analytic import GaussianData, GaussianMixture
from difflab.cli.main import main
from difflab.data.source import Batch
from difflab.objectives import RectifiedFlowObjective
from difflab.parameterization import Denoiser
from difflab.pipeline import Pipeline
from difflab.process import RectifiedFlow, make_process
from difflab.recipes.distill import (
    DISTILL_METHODS,
    ReflowConfig,
    build_reflow,
    reflow_pairs,
    teacher_pairs,
)
from difflab.recipes.distill.reflow import ReflowLoss
from difflab.samplers import ddim, dpmpp_2m, heun, time_grid
from difflab.training import StepContext

F64 = torch.float64


def mixture(name: str) -> GaussianMixture:
    mu = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64)
    return GaussianMixture(make_process(name), mu, torch.tensor([0.3, 0.2], dtype=F64))


@pytest.mark.parametrize("name", ["vpsde", "cosine", "rectified_flow"])
@pytest.mark.parametrize("sampler,fn", [("dpmpp_2m", dpmpp_2m), ("heun", heun)],
                         ids=["dpmpp_2m", "heun"])
def test_pairs_are_the_teachers_ode_map(name, sampler, fn):
    """Each pair's sample is the sampler run on sigma_max z, whatever the batching; for a VP
    teacher (eps or any prediction) that is its probability-flow ODE map."""
    data = mixture(name)
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ts = time_grid(data.process, 6)
    direct = fn(data, float(data.process.sigma(ts[0])) * z, ts)
    for batch_size in (7, 3, 1):
        assert torch.equal(reflow_pairs(data, sampler, 6, z, batch_size=batch_size), direct)


def test_pairs_converge_to_the_exact_ode_map_of_a_vp_teacher():
    """With more steps the pairs approach the exact PF-ODE map of the VP teacher."""
    p = make_process("vpsde")
    gauss = GaussianData(p, torch.tensor([0.3, -0.5], dtype=F64),
                         torch.tensor([0.4, 1.3], dtype=F64))
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ts = time_grid(p, 64)
    exact = gauss(gauss.ode_solution(float(p.sigma(1.0)) * z, 1.0, float(ts[-2])), ts[-2]).x0
    errs = [float((reflow_pairs(gauss, "heun", n, z) - exact).abs().max()) for n in (16, 64)]
    assert errs[1] < errs[0] and errs[1] < 1e-2, errs


def test_refuses_a_stochastic_sampler():
    with pytest.raises(ValueError, match="ODE"):
        reflow_pairs(mixture("vpsde"), "ddpm", 4, torch.zeros(2, 2, dtype=F64))


class StraightAffine(nn.Module):
    """The exact reflow velocity of an affine coupling x = a z + b: on x_t = (1 - t) x + t z,
    z = (x_t - (1 - t) b) / ((1 - t) a + t), and u = z - x = (1 - a) z - b."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, x, c_noise, cond=None):
        t = (c_noise.to(x.dtype) / 1000)[:, None]
        z = (x - (1 - t) * self.b) / ((1 - t) * self.a + t)
        return (1 - self.a) * z - self.b


def test_loss_vanishes_for_the_straight_student_and_it_is_exact_in_one_step():
    """Gaussian data: every ODE sampler's map is affine per coordinate, x = a z + b; the
    student with the straight velocity of that coupling has zero reflow loss, and one
    Euler (DDIM) step from t = 1 reproduces the teacher's samples."""
    teacher = GaussianData(make_process("cosine"), torch.tensor([0.3, -0.5], dtype=F64),
                           torch.tensor([0.4, 1.3], dtype=F64))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    x = reflow_pairs(teacher, "dpmpp_2m", 8, z)
    a = (x[1] - x[0]) / (z[1] - z[0])
    b = x[0] - a * z[0]
    assert torch.allclose(x, a * z + b, atol=1e-10)  # affine indeed
    module = StraightAffine(a, b).double()
    loss_fn = ReflowLoss(RectifiedFlowObjective())
    ctx = StepContext(0, torch.Generator().manual_seed(3), slice(None), torch.device("cpu"))
    with torch.no_grad():
        loss = loss_fn(module, Batch(torch.stack([x, z], 1)), ctx)
        wrong = loss_fn(module, Batch(torch.stack([z, x], 1)), ctx)  # pairs swapped
    assert float(loss.max()) < 1e-10 and float(wrong.min()) > 1e-3
    student = Denoiser(module, RectifiedFlow(), "flow")
    with torch.no_grad():
        one = ddim(student, z, time_grid(student.process, 1))
        four = ddim(student, z, time_grid(student.process, 4))
    assert torch.allclose(one, x, atol=1e-5) and torch.allclose(four, x, atol=1e-5)


def test_registered_and_bad_options():
    assert DISTILL_METHODS["reflow"].config is ReflowConfig
    with pytest.raises(ValueError, match="--teacher is required"):
        build_reflow(ReflowConfig())
    with pytest.raises(ValueError, match="ODE sampler"):
        build_reflow(ReflowConfig(teacher="x", teacher_sampler="ddpm"))


@pytest.mark.slow
def test_distill_reflow_cli_makes_a_one_step_flow_pipeline(tmp_path, capsys):
    """A VP eps-prediction digits teacher: the student is a flow model on the rectified-flow
    process, its own sampler is one DDIM step, and its pairs are the teacher pipeline's own
    samples from the same noise (the teacher's PF-ODE map)."""
    train_tiny_digits(tmp_path, steps=2)
    out = tmp_path / "student"
    assert main(["distill", "reflow", "--teacher", str(tmp_path / "run"), "--pairs", "8",
                 "--teacher-steps", "2", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                 "--out-dir", str(out), "--no-progress"]) == 0
    assert "sample with: difflab sample --checkpoint" in capsys.readouterr().out
    pipe = Pipeline.from_pretrained(out)
    assert pipe.stage.prediction == "flow" and isinstance(pipe.process, RectifiedFlow)
    assert (pipe.stage.sampler, pipe.stage.sampler_steps) == ("ddim", 1)
    teacher = Pipeline.from_pretrained(tmp_path / "run")
    z, x, labels = teacher_pairs(teacher, ReflowConfig(teacher="", teacher_steps=2, pairs=3))
    ts = time_grid(teacher.process, 2)
    direct = dpmpp_2m(teacher.denoiser(), float(teacher.process.sigma(ts[0])) * z, ts,
                      cond=labels)
    assert labels is not None and torch.equal(x, direct)
    assert main(["sample", "--checkpoint", str(out), "--sampler", "euler_ode", "--steps", "1",
                 "--n", "2", "--class", "3", "--out", str(tmp_path / "g.png"),
                 "--no-progress"]) == 0
    assert (tmp_path / "g.png").exists()


def test_heun_without_churn_draws_no_noise():
    """(A fix found here: rounding between two computations of sigma~ let heun add noise
    from the global RNG with churn = 0; the teacher's map must be deterministic.)"""
    data = mixture("vpsde")
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    ts = time_grid(data.process, 8)
    state = torch.random.get_rng_state()
    first = heun(data, z, ts)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(heun(data, z, ts), first)
