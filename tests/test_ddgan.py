"""The denoising diffusion GAN: its posterior step is difflab's q(x_{t-1} | x_t, x0), a
generator that outputs the true x0 of a point mass samples it exactly, z comes from the
sampling generator, and a tiny `difflab train --objective ddgan` run samples through the
ordinary pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.cli.main import main
from difflab.conditioning import LatentCond
from difflab.networks import LatentUNet, LatentUNetConfig, NoisyClassifier
from difflab.networks.classifier import ClassifierConfig
from difflab.parameterization import Denoiser
from difflab.pipeline import Pipeline
from difflab.process import DiscreteProcess
from difflab.process.gaussian import posterior
from difflab.recipes.ddgan import (
    DDGANPair,
    DDGANSetup,
    posterior_coefficients,
    posterior_sample,
    real_pair,
)
from difflab.samplers import ddgan, time_grid


def test_posterior_is_the_ddpm_posterior_of_the_chain():
    process = DiscreteProcess("cosine", 4)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    c0, ct, var = posterior_coefficients(process, t, t - 1)
    ref = posterior(process, t)
    torch.testing.assert_close(c0, ref.coef_x0)
    torch.testing.assert_close(ct, ref.coef_xt)
    torch.testing.assert_close(var, ref.var)
    x0, xt, e = torch.randn(3, 4, 2, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(posterior_sample(process, x0, xt, t, t - 1, e),
                               ref.mean(x0, xt) + ref.var.sqrt()[:, None] * e)


def test_real_pairs_have_the_forward_marginals():
    process = DiscreteProcess("cosine", 1000)
    n = 40_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    t, s = torch.full((n,), 750.0, dtype=torch.float64), torch.full((n,), 500.0,
                                                                     dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    e1, e2 = (torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(2))
    x_s, x_t = real_pair(process, x0, t, s, e1, e2)
    a, sig = process.alpha_sigma(torch.tensor(750.0, dtype=torch.float64))
    assert abs(float(x_t.mean()) - 0.7 * float(a)) < 0.02
    assert abs(float(x_t.std()) - float(sig)) < 0.02
    # s = 0: x_s is the data itself
    x_s0, _ = real_pair(process, x0[:5], t[:5], torch.zeros(5, dtype=torch.float64),
                        e1[:5], e2[:5])
    assert torch.equal(x_s0, x0[:5])


class PointMass(nn.Module):
    """A 'generator' that returns the one data point whatever x_t and z (and records z)."""

    def __init__(self, point: torch.Tensor):
        super().__init__()
        self.point, self.seen = point, []
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))  # runs in float64

    def forward(self, x, c_noise, cond=None):
        self.seen.append(cond)
        return self.point.expand_as(x).to(x.dtype) + 0 * self.w


def test_sampler_with_the_true_x0_returns_the_point_and_draws_z_from_its_generator():
    process = DiscreteProcess("cosine", 1000)
    point = torch.tensor([0.3, -0.8], dtype=torch.float64)
    net = PointMass(point)
    den = Denoiser(net, process, "x0")
    x = torch.randn(5, 2, dtype=torch.float64)
    ts = time_grid(process, 4)
    out = ddgan(den, x, ts, torch.Generator().manual_seed(3))
    assert torch.equal(out, point.expand(5, 2))
    assert len(net.seen) == 4 and all(isinstance(c, LatentCond) for c in net.seen)
    # the same seed gives the same z; z is not the global RNG's
    first = [c.z for c in net.seen]
    net.seen.clear()
    torch.manual_seed(123)
    ddgan(den, x, ts, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, c.z) for a, c in zip(first, net.seen, strict=True))


def test_latent_unet_uses_z_and_zero_without_it():
    cfg = LatentUNetConfig(unet={"in_channels": 1, "image_size": 8, "base_channels": 8,
                                 "channel_mult": [1, 2], "num_res_blocks": 1,
                                 "attention_resolutions": [], "num_classes": 3})
    net = LatentUNet(cfg).eval()
    x, z = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    c, y = torch.tensor([5.0, 9.0]), torch.tensor([0, 2])
    plain = net(x, c, y)
    assert torch.equal(plain, net(x, c, LatentCond(y, torch.zeros_like(x))))
    nn.init.normal_(net.unet.out[-1].weight)  # zero-initialised output layer otherwise
    assert not torch.allclose(net(x, c, LatentCond(y, z)), net(x, c, y))


def test_one_backward_splits_generator_and_discriminator_gradients():
    torch.manual_seed(0)
    gen = LatentUNet(LatentUNetConfig(unet={"in_channels": 1, "image_size": 8,
                                            "base_channels": 8, "channel_mult": [1, 2],
                                            "num_res_blocks": 1, "attention_resolutions": [],
                                            "num_classes": 3, "dropout": 0.0}))
    nn.init.normal_(gen.unet.out[-1].weight, std=0.1)
    disc = NoisyClassifier(ClassifierConfig(num_classes=3, in_channels=2, image_size=8,
                                            base_channels=8, channel_mult=(1, 2)))
    pair = DDGANPair(gen, disc, conditional=True)
    process = DiscreteProcess("cosine", 1000)
    setup = DDGANSetup(process, r1_gamma=0.5)
    g = torch.Generator().manual_seed(1)
    x0, labels = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 1])
    t = torch.tensor([1000.0, 750.0, 500.0, 250.0], dtype=torch.float64)
    s = torch.tensor([750.0, 500.0, 250.0, 0.0], dtype=torch.float64)
    noise = tuple(torch.randn(4, 1, 8, 8, generator=g) for _ in range(4))
    pair(x0, labels, t, s, noise, setup).sum().backward()
    split = {k: p.grad.clone() for k, p in pair.named_parameters() if p.grad is not None}
    pair.zero_grad()
    terms = pair.losses(x0, labels, t, s, noise, setup)
    # the generator's own loss through a D with gradients, then D's own loss
    e1, e2, z, e3 = noise
    x_s, x_t = real_pair(process, x0, t, s, e1, e2)
    c = process.c_noise(t).float()
    fake = posterior_sample(process, gen(x_t, c, LatentCond(labels, z)), x_t, t, s, e3)
    logit = disc(torch.cat([fake, x_t], 1), c).gather(1, labels[:, None])[:, 0]
    gl = torch.nn.functional.softplus(-logit).sum()
    for (name, p), gr in zip(gen.named_parameters(),
                             torch.autograd.grad(gl, list(gen.parameters()),
                                                 allow_unused=True), strict=True):
        expect = torch.zeros_like(p) if gr is None else gr
        torch.testing.assert_close(split.get(f"generator.{name}", torch.zeros_like(p)),
                                   expect, atol=1e-6, rtol=1e-4)
    dl = (terms["d"] + 0.25 * terms["r1"]).sum()
    for (name, p), gr in zip(disc.named_parameters(),
                             torch.autograd.grad(dl, list(disc.parameters()),
                                                 allow_unused=True), strict=True):
        expect = torch.zeros_like(p) if gr is None else gr
        torch.testing.assert_close(split.get(f"disc.{name}", torch.zeros_like(p)), expect,
                                   atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_cli_trains_ddgan_and_samples_with_its_own_sampler(tmp_path, capsys):
    out = tmp_path / "gan"
    assert main(["train", "--objective", "ddgan", "--gan-steps", "2", "--steps", "2",
                 "--batch-size", "8", "--base-channels", "8", "--channel-mult", "1", "2",
                 "--num-res-blocks", "1", "--attention-resolutions", "--lr", "2e-4",
                 "--sample-every", "0", "--checkpoint-every", "0", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    pipe = Pipeline.from_pretrained(out)
    assert pipe.stage.network == "latent_unet" and pipe.stage.prediction == "x0"
    assert pipe.stage.sampler == "ddgan" and pipe.stage.sampler_steps == 2
    a = pipe(3, labels=4, seed=7).samples
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, pipe(3, labels=4, seed=7).samples)   # z from the seeds
    guided = pipe(3, labels=4, seed=7, guidance=2.0).samples  # both branches share z
    assert torch.isfinite(guided).all() and not torch.equal(guided, a)
    assert main(["sample", "--checkpoint", str(out), "--n", "2", "--class", "1", "--out",
                 str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert "(ddgan, 2 steps)" in capsys.readouterr().out
