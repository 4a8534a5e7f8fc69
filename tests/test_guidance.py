"""Classifier-free and classifier guidance: exact limits, batching, gradients, dropout rate."""

import math

import pytest
import torch

from difflab.cli.main import main
from difflab.data import load_digits
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, log_prob_grad
from difflab.networks import ClassifierConfig, NoisyClassifier, UNet, UNetConfig
from difflab.parameterization import Denoiser
from difflab.process import make_process
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.samplers import ddim, ddpm, time_grid


def perturbed(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def model():
    net = perturbed(UNet(UNetConfig(in_channels=1, image_size=8, base_channels=16,
                                    channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(), num_classes=10)))
    return Denoiser(net, make_process("linear"), "eps")


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([1, 3, 5, 7][:n])


def test_cfg_limits_are_exact(model):
    x, y = batch()
    t = torch.full((4,), 500.0, dtype=torch.float64)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    one = ClassifierFreeGuidance(model, 1.0, null_label=10)(x, t, y)
    zero = ClassifierFreeGuidance(model, 0.0, null_label=10)(x, t, y)
    assert torch.equal(one.eps, cond.eps) and torch.equal(one.x0, cond.x0)
    assert torch.equal(zero.eps, uncond.eps) and torch.equal(zero.x0, uncond.x0)
    g3 = ClassifierFreeGuidance(model, 3.0, null_label=10)(x, t, y)
    torch.testing.assert_close(g3.eps, uncond.eps + 3 * (cond.eps - uncond.eps),
                               rtol=1e-5, atol=1e-5)
    w2 = ClassifierFreeGuidance.from_w(model, 2.0, null_label=10)(x, t, y)
    torch.testing.assert_close(w2.eps, 3 * cond.eps - 2 * uncond.eps, rtol=1e-5, atol=1e-5)
    # x0 and eps stay consistent: x = alpha x0 + sigma eps
    a, s = model.process.alpha_sigma(t)
    torch.testing.assert_close(a.float()[:, None, None, None] * g3.x0
                               + s.float()[:, None, None, None] * g3.eps, x,
                               rtol=1e-4, atol=1e-4)


def test_batched_and_unbatched_guidance_agree(model):
    x, y = batch()
    t = torch.full((4,), 300.0, dtype=torch.float64)
    a = ClassifierFreeGuidance(model, 4.0, 10, batched=True)(x, t, y)
    b = ClassifierFreeGuidance(model, 4.0, 10, batched=False)(x, t, y)
    torch.testing.assert_close(a.eps, b.eps, rtol=1e-5, atol=1e-5)


def test_interval_and_rescale(model):
    x, y = batch()
    t = torch.full((4,), 900.0, dtype=torch.float64)
    outside = ClassifierFreeGuidance(model, 5.0, 10, interval=(0.0, 500.0))(x, t, y)
    assert torch.equal(outside.eps, model(x, t, y).eps)
    r = ClassifierFreeGuidance(model, 5.0, 10, rescale=1.0)(x, t[:4] * 0 + 300, y)
    cond = model(x, t * 0 + 300, y)
    torch.testing.assert_close(r.x0.flatten(1).std(1), cond.x0.flatten(1).std(1),
                               rtol=1e-4, atol=1e-5)
    for sampler in (ddim, ddpm):  # a wrapper is a denoiser: every sampler takes it
        out = sampler(ClassifierFreeGuidance(model, 2.0, 10), x, time_grid(model.process, 3),
                      torch.Generator().manual_seed(0), cond=y)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_classifier_gradient_matches_finite_differences():
    clf = perturbed(NoisyClassifier(ClassifierConfig(num_classes=3, base_channels=16,
                                                     channel_mult=(1,)))).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c, y = torch.tensor([100.0, 700.0], dtype=torch.float64), torch.tensor([0, 2])
    grad = log_prob_grad(clf, x, c, y)

    @torch.no_grad()
    def logp(z):
        return torch.log_softmax(clf(z, c), -1).gather(1, y[:, None]).sum()

    h = 1e-6
    for idx in [(0, 0, 3, 4), (1, 0, 0, 7), (1, 0, 5, 2)]:
        e = torch.zeros_like(x)
        e[idx] = h
        fd = (logp(x + e) - logp(x - e)) / (2 * h)
        assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


def test_classifier_guidance_shifts_eps_by_sigma_grad(model):
    clf = perturbed(NoisyClassifier(ClassifierConfig(num_classes=10, base_channels=16)))
    x, y = batch()
    t = torch.full((4,), 400.0, dtype=torch.float64)
    out = ClassifierGuidance(model, clf, 2.0)(x, t, y)
    grad = log_prob_grad(clf, x, model.process.c_noise(t).float(), y)
    sigma = model.process.sigma(t).float()[:, None, None, None]
    torch.testing.assert_close(out.eps, model(x, t, y).eps - 2.0 * sigma * grad,
                               rtol=1e-5, atol=1e-5)
    other = ClassifierGuidance(model, clf, 2.0, classifier_process=make_process("vpsde"))
    t_c = other.classifier_process.t_from_log_snr(model.process.log_snr(t))
    torch.testing.assert_close(other.classifier_c_noise(t), 1000 * t_c)


def test_condition_dropout_rate_matches_p_uncond(tmp_path):
    d = load_digits()
    tr = DiffusionRecipe(TrainConfig.from_values(dict(
                             out_dir=str(tmp_path), p_uncond=0.3, batch_size=512,
                             base_channels=16, channel_mult=[1], num_res_blocks=1,
                             attention_resolutions=[], device="cpu")), data=d)
    labels = torch.cat([tr.batch(k)[1] for k in range(8)])
    rate, n = float((labels == 10).float().mean()), len(labels)
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)


def test_cli_guidance_and_classifier(tmp_path, capsys):
    common = ["--steps", "2", "--batch-size", "8", "--base-channels", "16", "--channel-mult",
              "1", "--num-res-blocks", "1", "--attention-resolutions", "--device", "cpu",
              "--no-progress"]
    assert main(["train", "--out-dir", str(tmp_path / "m"), "--sample-every", "0",
                 *common]) == 0
    assert main(["train-classifier", "--out-dir", str(tmp_path / "c"), *common]) == 0
    assert "classifier checkpoint" in capsys.readouterr().out
    out = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "m"), "--n", "4", "--steps", "3",
                 "--class", "2", "--guidance", "3", "--classifier", str(tmp_path / "c"),
                 "--classifier-scale", "2", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    assert out.exists()
    assert main(["sample", "--checkpoint", str(tmp_path / "m"), "--classifier",
                 str(tmp_path / "m"), "--device", "cpu"]) == 2
    assert "not a classifier" in capsys.readouterr().err
