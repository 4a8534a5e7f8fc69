"""Adversarial diffusion distillation: the one-backward split of generator and discriminator
gradients, the GAN losses against closed forms, the score-distillation target, the renoise
sampler, and a tiny end-to-end CLI run."""

from __future__ import annotations

import pytest
import torch
from conftest import train_tiny_digits
from torch import nn

from difflab.analytic import GaussianMixture
from difflab.cli.main import main
from difflab.networks import build_network
from difflab.parameterization import Denoiser
from difflab.pipeline import Pipeline
from difflab.process import DiscreteProcess
from difflab.recipes.distill.adversarial import (
    AdversarialConfig,
    AdversarialPair,
    Frozen,
    distillation_target,
    student_times,
)
from difflab.recipes.distill.gan import (
    ProjectionHeads,
    detached_call,
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    r1_penalty,
)
from difflab.samplers import renoise, time_grid


def test_hinge_and_nonsaturating_losses_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(hinge_d_loss(real, fake), torch.tensor([0.0, 1.5, 6.0]))
    assert torch.equal(hinge_g_loss(fake), -fake)
    sig = torch.sigmoid
    assert torch.allclose(nonsaturating_d_loss(real, fake),
                          -torch.log(sig(real)) - torch.log(1 - sig(fake)))
    assert torch.allclose(nonsaturating_g_loss(fake), -torch.log(sig(fake)))


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm():
    w = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, 4, 4)
    logits, r1 = r1_penalty(lambda x: (x * w).flatten(1).sum(1) + 0.3, x)
    assert torch.allclose(logits, (x * w).flatten(1).sum(1) + 0.3)
    assert torch.allclose(r1, w.pow(2).sum().expand(5))
    # a quadratic one: D(x) = a |x|^2 / 2 has grad a x, so R1 = a^2 |x|^2, which trains a
    a = torch.tensor(2.0, requires_grad=True)
    _, r1 = r1_penalty(lambda x: a * x.pow(2).flatten(1).sum(1) / 2, x)
    assert torch.allclose(r1, 4 * x.pow(2).flatten(1).sum(1))
    (g,) = torch.autograd.grad(r1.sum(), a)
    assert torch.allclose(g, 2 * a.detach() * x.pow(2).sum())


def test_detached_call_passes_gradient_to_inputs_only():
    lin = nn.Linear(3, 1)
    x = torch.randn(4, 3, requires_grad=True)
    detached_call(lin, x).sum().backward()
    assert lin.weight.grad is None and torch.allclose(x.grad, lin.weight.expand(4, 3))


def _tiny_pair(seed=0):
    torch.manual_seed(seed)
    student = build_network("mlp", {"dim": 4, "hidden": 16, "depth": 1, "time_dim": 8,
                                    "num_classes": 3})
    heads = ProjectionHeads([2, 4], hidden=5, num_classes=3)
    return AdversarialPair(student, heads)


def _features(x):  # a frozen, differentiable "feature network" of 4-d points
    return [x[:, :2, None, None] ** 2, torch.tanh(x)[:, :, None, None]]


def test_one_backward_gives_each_player_the_gradient_of_its_own_loss():
    process = DiscreteProcess("cosine", 100)
    gm = GaussianMixture(process, torch.randn(3, 4), torch.full((3,), 0.3))
    fz = Frozen(gm, _features, process, "eps", 0.5, distill_weight=2.5,
                r1_gamma=0.7)
    pair = _tiny_pair()
    g = torch.Generator().manual_seed(1)
    b = 6
    x0, labels = torch.randn(b, 4, generator=g), torch.randint(3, (b,), generator=g)
    s = torch.tensor([90.0, 50.0, 20.0]).repeat(2)
    x_s = process.alpha(s).float()[:, None] * x0 + process.sigma(s).float()[:, None] \
        * torch.randn(b, 4, generator=g)
    t = process.sample_t(b, g)
    noise = torch.randn(b, 4, generator=g)
    pair(x0, labels, x_s, s, t, noise, fz).sum().backward()
    split = {k: p.grad.clone() for k, p in pair.named_parameters()}

    # reference: each player's own loss alone, written plainly (no detaching tricks)
    ref = _tiny_pair()
    fake = Denoiser(ref.student, process, "eps")(x_s, s, labels).x0
    with torch.no_grad():
        x_t = process.alpha(t).float()[:, None] * fake + process.sigma(t).float()[:, None] \
            * noise
        target = gm(x_t, t, labels).x0
    loss_g = (-ref.heads(_features(fake), labels)
              + 2.5 * process.alpha(t).float() * (fake - target).pow(2).mean(1)).sum()
    grads_g = torch.autograd.grad(loss_g, list(ref.student.parameters()), retain_graph=True)
    xr = x0.clone().requires_grad_(True)
    d_real = ref.heads(_features(xr), labels)
    (gx,) = torch.autograd.grad(d_real.sum(), xr, create_graph=True)
    loss_d = (torch.relu(1 - d_real) + torch.relu(1 + ref.heads(_features(fake), labels))
              + 0.35 * gx.pow(2).sum(1)).sum()
    grads_d = torch.autograd.grad(loss_d, list(ref.heads.parameters()))
    names_g = [f"student.{k}" for k, _ in ref.student.named_parameters()]
    names_d = [f"heads.{k}" for k, _ in ref.heads.named_parameters()]
    for name, gr in zip(names_g + names_d, grads_g + grads_d, strict=True):
        # float32 sums in another order: a tolerance relative to the tensor's scale
        scale = float(gr.abs().max()) + 1e-12
        assert torch.allclose(split[name], gr, atol=1e-5 * scale, rtol=1e-4), name
    assert any(gr.abs().sum() > 0 for gr in grads_g) and any(gr.abs().sum() > 0
                                                            for gr in grads_d)


def test_distillation_target_is_the_teachers_x0_at_the_renoised_point():
    process = DiscreteProcess("cosine", 1000)
    teacher = GaussianMixture(process, torch.randn(2, 3), torch.full((2,), 0.2),
                              torch.tensor([0.3, 0.7]))
    x0_hat = torch.randn(5, 3, requires_grad=True)
    t = torch.tensor([1.0, 10.0, 300.0, 700.0, 999.0], dtype=torch.float64)
    noise = torch.randn(5, 3)
    x_t, target = distillation_target(teacher, x0_hat, t, noise)
    a, s = process.alpha_sigma(t)
    expect_xt = a.float()[:, None] * x0_hat.detach() + s.float()[:, None] * noise
    assert torch.allclose(x_t, expect_xt)
    assert torch.allclose(target, teacher(expect_xt, t).x0)
    assert not target.requires_grad and not x_t.requires_grad


def test_student_times_and_renoise_sampler_on_them():
    process = DiscreteProcess("cosine", 1000)
    assert student_times(process, 4, 950).tolist() == [950.0, 750.0, 500.0, 250.0]
    with pytest.raises(ValueError, match="--t-start"):
        student_times(process, 4, 1001)
    # 1, 2 and 4 renoise steps visit subsets of the student's times
    den = GaussianMixture(process, torch.tensor([[0.5, -0.5]]), torch.tensor([0.0]))
    for k, expect in ((1, [950.0]), (2, [950.0, 500.0]), (4, [950.0, 750.0, 500.0, 250.0])):
        seen: list[float] = []
        x = torch.randn(3, 2, dtype=torch.float64)
        out = renoise(den, x, time_grid(process, k), torch.Generator().manual_seed(0),
                      lambda info, seen=seen: seen.append(float(info.t)), t_start=950.0)
        assert seen == expect
        # a point-mass data set: every step's x0 is that point, whatever the noise
        assert torch.allclose(out, torch.tensor([0.5, -0.5], dtype=torch.float64).expand(3, 2))
    with pytest.raises(ValueError, match="t_start"):
        renoise(den, x, time_grid(process, 40), t_start=950.0)


def test_renoise_step_is_a_fresh_forward_draw():
    process = DiscreteProcess("cosine", 1000)
    den = GaussianMixture(process, torch.randn(2, 2), torch.full((2,), 0.3))
    x = torch.randn(4, 2, dtype=torch.float64)
    ts = torch.tensor([800.0, 300.0, 0.0], dtype=torch.float64)
    out = renoise(den, x, ts, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    a, s = process.alpha_sigma(torch.tensor(300.0, dtype=torch.float64))
    x1 = a * den(x, ts[0]).x0 + s * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert torch.allclose(out, den(x1, ts[1]).x0)


@pytest.mark.slow
def test_cli_distils_and_the_student_samples_at_1_2_4_steps(tmp_path, capsys):
    train_tiny_digits(tmp_path, steps=2)
    out = tmp_path / "add"
    assert main(["distill", "adversarial", "--teacher", str(tmp_path / "run"), "--out-dir",
                 str(out), "--steps", "3", "--batch-size", "8", "--device", "cpu",
                 "--no-progress"]) == 0
    pipe = Pipeline.from_pretrained(out)
    assert pipe.stage.sampler == "renoise" and pipe.stage.sampler_steps == 4
    assert pipe.stage.weights_prefix == "ema.student"
    assert pipe.stage.sampler_options == {"t_start": 950.0}
    assert pipe.stage.prediction == "eps"  # the tiny teacher's own (--prediction teacher)
    for k in (1, 2, 4):
        x = pipe(3, labels=2, steps=k, seed=0).samples
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    assert main(["sample", "--checkpoint", str(out), "--n", "2", "--class", "1", "--out",
                 str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert "(renoise, 4 steps)" in capsys.readouterr().out


def test_source_conditioned_heads_add_the_image_projection_term():
    torch.manual_seed(0)
    heads = ProjectionHeads([2, 4], hidden=5, num_classes=3, source=True)
    x, src = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.arange(6) % 3
    feats, sfeats = _features(x), _features(src)
    extra = 0
    for k, f in enumerate(feats):
        a = torch.nn.functional.leaky_relu(heads.mix[k](f), 0.2).mean((2, 3))
        extra = extra + (heads.source[k](sfeats[k].mean((2, 3))) * a).sum(1)
    assert torch.allclose(heads(feats, labels, sfeats), heads(feats, labels) + extra,
                          atol=1e-6)
    assert not torch.allclose(heads(feats, labels, sfeats), heads(feats, labels, feats))
    assert ProjectionHeads([2, 4], hidden=5).source is None
    # the default: without it the digits student collapses to one image per class
    assert AdversarialConfig().source_cond and AdversarialConfig().prediction == "teacher"
