"""The latent-diffusion autoencoder: shapes, the posterior's closed forms, VQ, and a short fit."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from difflab.networks import NETWORKS, Autoencoder, AutoencoderConfig, build_network
from difflab.networks.autoencoder import PixelAttention, kl_standard_normal

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> Autoencoder:
    torch.manual_seed(0)
    cfg = dict(in_channels=3, block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4)
    return Autoencoder(AutoencoderConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("widths,f", [((8, 8, 16), 4), ((8, 8, 8, 16), 8)])
def test_shapes_and_downsample_factor(widths, f):
    ae = tiny(block_out_channels=widths, latent_channels=3, out_channels=2)
    assert ae.downsample_factor == f and ae.latent_channels == 3
    x = torch.rand(2, 3, 32, 16) * 2 - 1
    with torch.no_grad():
        post = ae.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 3, 32 // f, 16 // f)
        assert post.reg_loss.shape == (2,)
        assert ae.decode(post.mode()).shape == (2, 2, 32, 16)
        rec, _ = ae(x)
    assert rec.shape == (2, 2, 32, 16)


def test_bad_inputs_and_configs_name_the_problem():
    ae = tiny(block_out_channels=(8, 8, 16))
    with pytest.raises(ValueError, match="multiples of the down-sampling factor 4"):
        ae.encode(torch.zeros(1, 3, 16, 18))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"latent must be \[B, 4, H, W\]"):
        ae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide"):
        AutoencoderConfig(block_out_channels=(32, 48))
    with pytest.raises(ValueError, match="regularizer"):
        AutoencoderConfig(regularizer="ae")
    with pytest.raises(ValueError, match="regularizer='vq'"):
        ae.quantize(torch.zeros(1, 4, 2, 2))


def test_config_json_round_trip_and_registry():
    cfg = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, regularizer="vq")
    back = AutoencoderConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and back.block_out_channels == (8, 16)
    assert NETWORKS["autoencoder"] == (Autoencoder, AutoencoderConfig)
    ae = build_network("autoencoder", json.loads(json.dumps(asdict(cfg))))
    assert isinstance(ae, Autoencoder) and ae.config == cfg


def test_mode_is_deterministic_and_samples_follow_the_posterior():
    ae = tiny()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        a, b = ae.encode(x), ae.encode(x)
        assert torch.equal(a.mode(), b.mode()) and torch.equal(a.mode(), a.mean)
        assert torch.equal(ae.decode(a.mode()), ae.decode(b.mode()))
        rec, _ = ae(x, sample=False)
        assert torch.equal(rec, ae.decode(a.mode()))
        # a sample is mean + std * eps, eps from the generator (reparameterisation)
        z = a.sample(torch.Generator().manual_seed(5))
        eps = torch.randn(a.mean.shape, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(z, a.mean + torch.exp(0.5 * a.logvar) * eps)
        assert not torch.equal(z, a.sample(torch.Generator().manual_seed(6)))
        r1, _ = ae(x, generator=torch.Generator().manual_seed(1))
        r2, _ = ae(x, generator=torch.Generator().manual_seed(1))
        assert torch.equal(r1, r2)


def test_kl_closed_form_matches_torch_distributions_and_logvar_is_clamped():
    torch.manual_seed(1)
    mean, logvar = torch.randn(4, 3, 2, 5), torch.randn(4, 3, 2, 5)
    direct = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_standard_normal(mean, logvar), direct.flatten(1).sum(1))
    assert torch.equal(kl_standard_normal(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)),
                       torch.zeros(2))
    ae = tiny()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        post = ae.encode(x)
        torch.testing.assert_close(post.reg_loss, kl_standard_normal(post.mean, post.logvar))
        ae.quant_conv.bias[4:] += 1e3  # push the log-variance channels far above the clamp
        assert torch.equal(ae.encode(x).logvar, torch.full_like(post.logvar, 20.0))


def test_sampled_latent_passes_gradients_to_mean_and_logvar():
    ae = tiny().train()
    post = ae.encode(torch.rand(2, 3, 8, 8))
    post.mean.retain_grad(), post.logvar.retain_grad()
    z = post.sample(torch.Generator().manual_seed(0))
    (z.square().sum() + post.reg_loss.sum()).backward()
    assert post.mean.grad.abs().sum() > 0 and post.logvar.grad.abs().sum() > 0


def test_pixel_attention_is_single_head_softmax_over_pixels():
    torch.manual_seed(2)
    attn = PixelAttention(8, groups=2)
    x = torch.randn(2, 8, 3, 4)
    t = attn.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    w = torch.softmax(attn.q(t) @ attn.k(t).transpose(1, 2) / math.sqrt(8), dim=-1)
    expect = x + attn.out(w @ attn.v(t)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), expect)


def test_vq_indices_are_nearest_and_the_loss_is_codebook_plus_commitment():
    ae = tiny(regularizer="vq", codebook_size=16, commitment=0.25)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        ze = ae.quant_conv(ae.encoder(x))  # [B, D, h, w] before quantisation
        flat = ze.permute(0, 2, 3, 1).reshape(-1, 4)
        # a codebook spread over the encoder's outputs, so that many entries are nearest
        ae.quantizer.codebook.weight.copy_(flat[::2] + 0.1 * torch.randn(16, 4) * flat.std(0))
        post = ae.encode(x)
    assert post.logvar is None and torch.equal(post.sample(), post.mode())
    codebook = ae.quantizer.codebook.weight
    brute = torch.cdist(flat, codebook).argmin(1).view(2, 4, 4)
    assert torch.equal(post.indices, brute)
    assert post.indices.unique().numel() > 1
    assert torch.equal(post.mean, codebook[post.indices].permute(0, 3, 1, 2))
    assert torch.equal(ae.quantize(ze), post.mean)
    # forward value of either term is ||z_e - e||^2, so reg = (1 + beta) * mean squared error
    torch.testing.assert_close(post.reg_loss, 1.25 * (ze - post.mean).square().mean((1, 2, 3)))


def test_vq_straight_through_gradient_reaches_the_encoder():
    ae = tiny(regularizer="vq", codebook_size=16).train()
    rec, post = ae(torch.rand(2, 3, 8, 8))
    # reconstruction only: the encoder has no path to it but the straight-through one
    rec.square().mean().backward(retain_graph=True)
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert ae.quantizer.codebook.weight.grad is None or not ae.quantizer.codebook.weight.grad.any()
    ae.zero_grad()
    post.reg_loss.sum().backward()  # the codebook term moves the codebook
    assert ae.quantizer.codebook.weight.grad.abs().sum() > 0
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment term


def fit(regularizer: str, steps: int, images: int, lr: float, **kw) -> tuple[float, float]:
    """Final reconstruction MSE (posterior mode) and the data variance after ``steps`` Adam
    steps of MSE + weight * reg_loss on ``images`` 8x8 digits."""
    from difflab.data import load_digits

    x = load_digits().images[:images]
    ae = tiny(in_channels=1, regularizer=regularizer, codebook_size=64, **kw).train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr, foreach=True)
    gen = torch.Generator().manual_seed(0)
    weight = 1e-6 if regularizer == "kl" else 1.0  # LDM's KL weight; VQ-VAE's loss as is
    for _ in range(steps):
        rec, post = ae(x, generator=gen)
        loss = (rec - x).square().mean() + weight * post.reg_loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rec, _ = ae.eval()(x, sample=False)
    return (rec - x).square().mean().item(), x.var().item()


def test_short_fit_reconstructs_its_training_images():
    mse, var = fit("kl", steps=80, images=8, lr=5e-3)
    assert mse < 0.1 * var, (mse, var)


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_longer_fit_reconstructs_closely(regularizer):
    mse, var = fit(regularizer, steps=300, images=32, lr=3e-3)
    assert mse < 0.02 * var, (mse, var)
