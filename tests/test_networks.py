"""Fast tests for difflab.networks (tiny widths; CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from difflab.networks import (
    NETWORKS,
    MLPConfig,
    MLPDenoiser,
    UNet,
    UNetConfig,
    build_network,
    count_parameters,
    timestep_embedding,
)
from difflab.networks.unet import group_count

TINY = {"base_channels": 16, "num_res_blocks": 1, "num_heads": 2}


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**TINY, **overrides}))


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Add noise to every parameter so zero-initialised layers become active."""
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(cfg: UNetConfig, batch: int = 3, size: int | None = None):
    size = cfg.image_size if size is None else size
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    c_noise = torch.rand(batch, generator=gen) * 1000
    return x, c_noise


# --------------------------------------------------------------------- embeddings
def test_timestep_embedding_shape_and_values():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb[0, :16], torch.ones(16)) and torch.allclose(
        emb[0, 16:], torch.zeros(16)
    )
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(1.0)))  # highest frequency is 1
    assert timestep_embedding(t, 7).shape == (3, 7)
    assert torch.all(timestep_embedding(t, 7)[:, -1] == 0)
    with pytest.raises(ValueError):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_group_count_divides():
    for ch in [1, 2, 3, 16, 24, 32, 48, 64, 96, 128, 320]:
        g = group_count(ch)
        assert ch % g == 0 and 1 <= g <= 32
        assert ch == 1 or ch // g >= 2  # never instance norm (would erase "add" conditioning)
    assert group_count(64) == 32 and group_count(256) == 32 and group_count(16) == 8


# --------------------------------------------------------------------- UNet shapes
@pytest.mark.parametrize(
    "overrides",
    [
        {"image_size": 8, "channel_mult": (1, 2), "attention_resolutions": (4,)},
        {"image_size": 8, "channel_mult": (1, 2), "attention_resolutions": ()},
        {"image_size": 16, "time_conditioning": "add", "num_classes": 5},
        {"image_size": 16, "in_channels": 3, "attention_resolutions": (16, 8)},
        {"image_size": 8, "in_channels": 3, "out_channels": 6, "time_conditioning": "add"},
        {"image_size": 16, "channel_mult": (1, 2, 2), "num_classes": 10, "dropout": 0.1},
    ],
)
def test_unet_output_shape(overrides):
    model = tiny_unet(**overrides)
    cfg = model.config
    x, c_noise = inputs(cfg)
    labels = torch.tensor([0, 1, 2]) if cfg.num_classes else None
    out = model(x, c_noise, labels)
    assert out.shape == (3, cfg.resolved_out_channels, cfg.image_size, cfg.image_size)


def test_unet_default_config_builds():
    model = UNet()
    assert model.config == UNetConfig()
    assert model.out_channels == 1


def test_fresh_unet_outputs_exact_zeros():
    model = tiny_unet(num_classes=3).eval()
    x, c_noise = inputs(model.config)
    assert torch.equal(model(x, c_noise), torch.zeros_like(x))


def test_scalar_c_noise_broadcasts():
    model = perturb(tiny_unet(image_size=8, channel_mult=(1, 2), attention_resolutions=()))
    x, _ = inputs(model.config)
    t = torch.tensor(250.0)
    assert torch.allclose(model(x, t), model(x, t.expand(3)))


# --------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("mode", ["add", "scale_shift"])
def test_output_depends_on_c_noise_and_labels(mode):
    model = perturb(tiny_unet(time_conditioning=mode, num_classes=4))
    x, c_noise = inputs(model.config)
    labels = torch.tensor([0, 1, 2])
    base = model(x, c_noise, labels)
    assert not torch.allclose(base, model(x, c_noise + 100.0, labels), atol=1e-4)
    assert not torch.allclose(base, model(x, c_noise, torch.tensor([3, 3, 3])), atol=1e-4)


def test_none_labels_means_null_label():
    model = perturb(tiny_unet(num_classes=4))
    x, c_noise = inputs(model.config)
    null = torch.full((3,), model.null_label, dtype=torch.long)
    assert model.null_label == 4
    assert torch.equal(model(x, c_noise), model(x, c_noise, null))


@pytest.mark.parametrize("bad", [[0, 1, 5], [-1, 0, 0]])
def test_invalid_labels_raise(bad):
    model = tiny_unet(num_classes=4)
    x, c_noise = inputs(model.config)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        model(x, c_noise, torch.tensor(bad))
    with pytest.raises(ValueError, match="integer"):
        model(x, c_noise, torch.zeros(3))


def test_labels_on_unconditional_model_raise():
    model = tiny_unet()
    x, c_noise = inputs(model.config)
    with pytest.raises(ValueError, match="num_classes"):
        model(x, c_noise, torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------- validation
def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(image_size=16, attention_resolutions=(32,))
    with pytest.raises(ValueError, match="time_conditioning"):
        UNetConfig(time_conditioning="film")
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(base_channels=16, num_heads=3)


def test_bad_input_shape_raises():
    model = tiny_unet()
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(2, 1, 10, 10), torch.zeros(2))
    with pytest.raises(ValueError, match="c_noise"):
        model(torch.zeros(2, 1, 16, 16), torch.zeros(3))


# --------------------------------------------------------------------- serialisation
def test_config_json_round_trip_gives_identical_model():
    model = perturb(tiny_unet(channel_mult=[1, 2, 2], attention_resolutions=[8], num_classes=3))
    d = json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert isinstance(d["channel_mult"], list)
    rebuilt = UNet(UNetConfig(**d)).eval()
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    x, c_noise = inputs(model.config)
    labels = torch.tensor([0, 3, 2])
    assert torch.equal(model(x, c_noise, labels), rebuilt(x, c_noise, labels))


def test_channels_last_matches_contiguous():
    model = perturb(tiny_unet(in_channels=3, num_classes=2))
    x, c_noise = inputs(model.config)
    out = model(x, c_noise)
    out_cl = model(x.to(memory_format=torch.channels_last), c_noise)
    assert out_cl.shape == out.shape
    assert torch.allclose(out, out_cl, atol=1e-5, rtol=0)


def test_gradient_reaches_every_parameter():
    model = perturb(tiny_unet(num_classes=3, time_conditioning="scale_shift")).train()
    x, c_noise = inputs(model.config)
    model(x, c_noise, torch.tensor([0, 1, 3])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient for {missing}"


# --------------------------------------------------------------------- MLP
def test_mlp_shapes_and_null_label():
    torch.manual_seed(0)
    model = perturb(MLPDenoiser(MLPConfig(dim=2, hidden=32, depth=2, time_dim=16, num_classes=3)))
    x, c_noise = torch.randn(5, 2), torch.rand(5) * 1000
    out = model(x, c_noise, torch.tensor([0, 1, 2, 3, 0]))
    assert out.shape == (5, 2)
    assert torch.equal(model(x, c_noise), model(x, c_noise, torch.full((5,), 3)))
    assert not torch.allclose(
        model(x, c_noise), model(x, c_noise, torch.zeros(5, dtype=torch.long))
    )
    assert not torch.allclose(out, model(x, c_noise + 50, torch.tensor([0, 1, 2, 3, 0])))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        model(x, c_noise, torch.tensor([0, 1, 2, 4, 0]))


def test_mlp_unconditional_and_default():
    model = MLPDenoiser()
    assert model(torch.randn(4, 2), torch.rand(4)).shape == (4, 2)
    with pytest.raises(ValueError):
        model(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="num_classes"):
        model(torch.randn(4, 2), torch.rand(4), torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------- registry
def test_build_network_and_count_parameters():
    assert set(NETWORKS) == {"unet", "mlp", "classifier", "latent_unet", "autoencoder", "dit",
                             "lora", "token_embeddings", "controlnet", "diffusers_unet",
                             "diffusers_autoencoder"}
    unet = build_network("unet", {**TINY, "image_size": 8, "channel_mult": [1, 2]})
    assert isinstance(unet, UNet) and unet.config.channel_mult == (1, 2)
    mlp = build_network("mlp", {"hidden": 8, "depth": 1, "time_dim": 4})
    assert isinstance(mlp, MLPDenoiser)
    # inp: (2+4)*8+8, time_mlp: 2*(4*4+4), block: 2*8 + 2*(8*8+8), out: 2*8 + 8*2+2
    assert count_parameters(mlp) == 56 + 40 + 160 + 34


def test_build_network_rejects_unknown_names_and_keys():
    with pytest.raises(ValueError, match="mlp"):
        build_network("transformer", {})
    with pytest.raises(ValueError, match="base_channel"):
        build_network("unet", {"base_channel": 8})
