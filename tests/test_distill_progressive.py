"""Progressive distillation (Salimans & Ho 2022) and guidance as a network input (Meng et al.
2023): exact targets on the Gaussian-mixture model, oracle students that reproduce the
teacher, the zero-initialised w embedding, and the command line end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_tiny_digits
from torch import nn

from difflab.analytic import GaussianMixture
from difflab.cli.main import main
from difflab.conditioning import GuidanceCond, cat_cond, expand_cond
from difflab.guidance import ClassifierFreeGuidance, ScaleInputCFG
from difflab.networks import UNet, UNetConfig, with_guidance_embedding
from difflab.parameterization import Denoiser, Prediction
from difflab.pipeline import Pipeline
from difflab.process import expand_like, make_process
from difflab.recipes.distill.progressive import (
    halving_schedule,
    loss_weight,
    progressive_loss,
    progressive_students,
    round_grid,
    two_step_target,
)
from difflab.samplers import ddim, time_grid
from difflab.training.loop import StepContext


def mixture(name: str = "cosine") -> GaussianMixture:
    mu = torch.tensor([[-1.0, 0.5], [0.8, -0.6], [0.3, 1.1]], dtype=torch.float64)
    return GaussianMixture(make_process(name), mu, torch.tensor([0.2, 0.3, 0.25]))


def noisy(gmm: GaussianMixture, t: float, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, s = gmm.process.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    x0 = gmm.sample(n, g)
    return a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)


class Oracle:
    """A student whose x0_hat is the exact progressive-distillation target of ``teacher`` on
    the N-step grid (what a perfectly trained student predicts)."""

    def __init__(self, teacher, n: int):
        self.teacher, self.process = teacher, teacher.process
        self.grid, self.mids = round_grid(self.process, n)

    def __call__(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        i = int((self.grid[:-1] - t[0]).abs().argmin())
        assert torch.allclose(self.grid[i], t[0])
        x0 = two_step_target(self.teacher, x, t, self.mids[i].expand_as(t),
                             self.grid[i + 1].expand_as(t))
        a, s = self.process.alpha_sigma(t)
        return Prediction(x0=x0, eps=(x - expand_like(a, x) * x0) / expand_like(s, x))


def ddim_until(denoiser, z, times):
    """x after DDIM steps through ``times`` (the sampler itself; a grid that does not end at
    t_min is continued to it, and x is read off where ``times`` ends)."""
    t_min = denoiser.process.t_min
    ts = torch.stack(list(times) + ([] if float(times[-1]) <= t_min else
                                    [torch.tensor(t_min, dtype=torch.float64)]))
    seen = []
    out = ddim(denoiser, z, ts, callback=lambda info: seen.append(info))
    return out if len(ts) == len(times) else seen[len(times) - 2].x


@pytest.mark.parametrize("schedule", ["cosine", "linear", "vpsde"])
@pytest.mark.parametrize("n", [8, 2, 1])
def test_one_step_with_the_target_lands_where_two_teacher_steps_land(schedule, n):
    gmm = mixture(schedule)
    grid, mids = round_grid(gmm.process, n)
    assert torch.equal(grid, time_grid(gmm.process, n))  # ddim's own grid for N steps
    for i in range(n):
        z = noisy(gmm, float(grid[i]), seed=i)
        t = grid[i].expand(len(z))
        target = two_step_target(gmm, z, t, mids[i].expand(len(z)), grid[i + 1].expand(len(z)))
        a, s = gmm.process.alpha_sigma(grid[i])

        def student(x, tt, cond=None, x0=target, a=a, s=s):
            return Prediction(x0=x0, eps=(x - a * x0) / s)
        student.process = gmm.process
        one = ddim_until(student, z, [grid[i], grid[i + 1]])
        two = ddim_until(gmm, z, [grid[i], mids[i], grid[i + 1]])
        torch.testing.assert_close(one, two, rtol=0, atol=1e-10)
        # and it is not simply the teacher's own one-step answer
        assert (gmm(z, grid[i]).x0 - target).abs().max() > 1e-3


def test_oracle_students_reproduce_the_teachers_2n_step_output():
    gmm = mixture()
    x = noisy(gmm, 1000.0, n=128, seed=3)
    teacher, steps = gmm, 16
    reference = ddim(gmm, x, time_grid(gmm.process, steps))
    for n in halving_schedule(steps, 1):  # 8, 4, 2, 1: each round's teacher is the last student
        student = Oracle(teacher, n)
        torch.testing.assert_close(ddim(student, x, time_grid(gmm.process, n)), reference,
                                   rtol=0, atol=1e-9)
        teacher = student
    # the one-step student's answer is far from the teacher's one DDIM step
    assert (ddim(gmm, x, time_grid(gmm.process, 1)) - reference).abs().max() > 0.1


class OracleV(nn.Module):
    """A v-prediction network whose x0_hat is ``target_fn``'s, read off (x, c_noise)."""

    def __init__(self, process, target_fn):
        super().__init__()
        self.process, self.target_fn = process, target_fn
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, c_noise, labels=None):
        p = self.process
        t = c_noise.double() * (p.t_max - p.t_min) / 1000.0 + p.t_min
        x0 = self.target_fn(x.double(), t)
        a, s = p.alpha_sigma(t)
        return ((expand_like(a, x) * x.double() - x0) / expand_like(s, x)).float() + self.dummy


def test_loss_is_zero_for_the_exact_student_and_not_for_the_teacher():
    gmm = mixture()
    grid, mids = round_grid(gmm.process, 4)

    def exact(x, t):
        i = (grid[:-1, None] - t[None]).abs().argmin(0)
        return two_step_target(gmm, x, t, mids[i], grid[i + 1])

    loss = progressive_loss(gmm, grid, mids, "snr+1")
    batch = type("Batch", (), {"x": gmm.sample(256, torch.Generator().manual_seed(0)).float(),
                               "labels": None})()

    def ctx():
        return StepContext(0, torch.Generator().manual_seed(1), slice(None), torch.device("cpu"))
    good = loss(OracleV(gmm.process, exact), batch, ctx())
    bad = loss(OracleV(gmm.process, lambda x, t: gmm(x, t).x0), batch, ctx())
    assert good.shape == (256,) and good.max() < 1e-6
    assert bad.mean() > 1e-3


def test_loss_weights():
    p = make_process("cosine")
    t = torch.tensor([1.0, 500.0, 1000.0], dtype=torch.float64)
    a, s = p.alpha_sigma(t)
    torch.testing.assert_close(loss_weight(p, t, "snr+1"), 1 / s**2)  # v-MSE = x-MSE / sigma^2
    torch.testing.assert_close(loss_weight(p, t, "truncated-snr"),
                               torch.maximum(a**2 / s**2, torch.ones(3, dtype=torch.float64)))


def test_schedules_and_grids_are_checked():
    assert halving_schedule(64, 1) == [32, 16, 8, 4, 2, 1]
    assert halving_schedule(12, 3) == [6, 3]
    for start, end in ((12, 5), (8, 8), (7, 1)):
        with pytest.raises(ValueError, match="--start-steps"):
            halving_schedule(start, end)
    with pytest.raises(ValueError, match="--start-steps"):
        round_grid(make_process("cosine", T=10), 8)


def tiny_unet(**kw) -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), num_classes=10, **kw))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.eval()


def test_zero_initialised_w_embedding_starts_as_the_teacher():
    teacher = tiny_unet()
    student = with_guidance_embedding(teacher)
    assert student.config.guidance_embedding and not teacher.config.guidance_embedding
    x, c = torch.randn(6, 1, 8, 8), torch.rand(6) * 1000
    y = torch.tensor([0, 3, 10, 7, 7, 2])
    with torch.no_grad():
        ref = teacher(x, c, y)
        for w in (0.0, 1.0, 2.5, 9.0):
            out = student.eval()(x, c, GuidanceCond(y, torch.full((6,), w)))
            assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="guidance scale"):
        student(x, c, y)
    with pytest.raises(ValueError, match="guidance_embedding"):
        teacher(x, c, GuidanceCond(y, torch.ones(6)))
    # the embedding trains: after one step the output depends on w
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    w = torch.linspace(0, 5, 6)
    (student(x, c, GuidanceCond(y, w)) ** 2).sum().backward()
    opt.step()
    student.eval()
    with torch.no_grad():
        a = student(x, c, GuidanceCond(y, torch.zeros(6)))
        b = student(x, c, GuidanceCond(y, torch.full((6,), 4.0)))
    assert not torch.equal(a, b)


def test_guidance_cond_batches_like_a_tensor():
    g = GuidanceCond(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]))
    assert len(g) == 3 and torch.equal(g[1:].cond, torch.tensor([2, 3]))
    both = cat_cond([g, g[0]])
    assert torch.equal(both.w, torch.tensor([1.0, 2.0, 3.0, 1.0]))
    assert len(expand_cond(g[2], 5)) == 5
    with pytest.raises(ValueError, match="guidance scales"):
        GuidanceCond(torch.tensor([1, 2]), torch.ones(3))


def test_guided_teacher_target_equals_cfg_at_that_w():
    process = make_process("cosine")
    base = Denoiser(tiny_unet(), process, "eps")
    guided = ScaleInputCFG(base, null_label=10)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 4, 4, 9])
    w = torch.tensor([1.0, 1.5, 3.0, 0.0])
    t = torch.full((4,), 600.0, dtype=torch.float64)
    tm, tn = torch.full_like(t, 500.0), torch.full_like(t, 400.0)
    pred = guided(x, t, GuidanceCond(y, w))
    target = two_step_target(guided, x, t, tm, tn, GuidanceCond(y, w))
    for i in range(4):
        cfg = ClassifierFreeGuidance(base, float(w[i]), null_label=10)
        ref = cfg(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(pred.x0[i:i + 1], ref.x0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pred.eps[i:i + 1], ref.eps, rtol=1e-5, atol=1e-6)
        ref_target = two_step_target(cfg, x[i:i + 1], t[i:i + 1], tm[i:i + 1], tn[i:i + 1],
                                     y[i:i + 1])
        torch.testing.assert_close(target[i:i + 1], ref_target, rtol=1e-5, atol=1e-6)


class Recorder(nn.Module):
    """Wraps a network and records the c_noise and conditions it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, c_noise, cond=None):
        self.calls.append((c_noise.clone(), cond))
        return self.net(x, c_noise, cond)


def test_cli_end_to_end(tmp_path, capsys):
    train_tiny_digits(tmp_path, steps=2)
    out = tmp_path / "pd"
    args = ["distill", "progressive", "--teacher", str(tmp_path / "run"), "--start-steps", "4",
            "--round-steps", "2", "--batch-size", "8", "--out-dir", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    index = json.loads((out / "rounds.json").read_text())
    assert [r["student_steps"] for r in index["rounds"]] == [2, 1]
    assert progressive_students(out) == {2: out / "steps_2", 1: out / "steps_1"}
    assert main(["sample", "--checkpoint", str(out), "--n", "2", "--class", "1",
                 "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert "(ddim, 1 steps)" in capsys.readouterr().out
    # the intermediate student loads with its own steps, on the grid it was distilled on
    pipe = Pipeline.from_pretrained(out / "steps_2")
    assert pipe.stage.prediction == "v" and pipe.default_sampler() == ("ddim", 2, {})
    rec = Recorder(pipe.base.net)
    pipe.base.net = rec
    own = pipe(2, labels=3, seed=0).samples
    named = pipe(2, labels=3, seed=0, sampler="ddim", steps=2).samples
    assert torch.equal(own, named)
    grid, _ = round_grid(pipe.process, 2)
    expected = pipe.process.c_noise(grid[:-1]).float()
    assert torch.equal(torch.stack([c[0] for c, _ in rec.calls[:2]]), expected)
    # the final student is the last round's
    final = Pipeline.from_pretrained(out)
    for a, b in zip(final.networks[0].state_dict().values(),
                    Pipeline.from_pretrained(out / "steps_1").networks[0].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    # running again resumes: finished rounds are not trained again
    before = (out / "steps_1" / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert (out / "steps_1" / "metrics.jsonl").read_text() == before
    # ... unless it is another run's folder
    assert main(args[:-1] + ["--weighting", "truncated-snr", "--no-progress"]) == 2
    assert "--weighting" in capsys.readouterr().err


def test_guided_cli_end_to_end(tmp_path, capsys):
    train_tiny_digits(tmp_path, steps=2)
    out = tmp_path / "gpd"
    assert main(["distill", "progressive", "--teacher", str(tmp_path / "run"), "--guided",
                 "--guided-steps", "2", "--w-min", "1", "--w-max", "3", "--start-steps", "2",
                 "--round-steps", "2", "--batch-size", "8", "--out-dir", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    assert (out / "guided").is_dir() and (out / "steps_1").is_dir()
    pipe = Pipeline.from_pretrained(out)
    assert pipe.stage.guidance_input and pipe.stage.guidance_range == [1.0, 3.0]
    rec = Recorder(pipe.base.net)
    pipe.base.net = rec
    a = pipe(3, labels=2, guidance=2.5, seed=0).samples
    assert len(rec.calls) == 1  # one step, one network call: no CFG batch doubling
    c_noise, cond = rec.calls[0]
    assert isinstance(cond, GuidanceCond) and torch.equal(cond.w, torch.full((3,), 2.5))
    assert len(c_noise) == 3
    assert a.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="two branches"):
        pipe(1, labels=2, guidance=2.0, guidance_rescale=0.5)
    assert main(["sample", "--checkpoint", str(out), "--n", "2", "--class", "1",
                 "--guidance", "2", "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0


def test_bad_options_are_one_line(tmp_path, capsys):
    train_tiny_digits(tmp_path, steps=2)
    base = ["distill", "progressive", "--teacher", str(tmp_path / "run"),
            "--out-dir", str(tmp_path / "x"), "--device", "cpu"]
    assert main(base + ["--start-steps", "12", "--end-steps", "5"]) == 2
    assert "--start-steps" in capsys.readouterr().err
    assert main(base + ["--start-steps", "4", "--round-steps", "1", "2", "3"]) == 2
    assert "--round-steps" in capsys.readouterr().err
    assert main(base + ["--w-min", "3", "--w-max", "2"]) == 2
