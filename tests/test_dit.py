"""The diffusion transformer (difflab.networks.dit): patchify round trip, adaLN-Zero identity
at initialisation, conditioning, the paper's sizes, and training / sampling through the CLI."""

import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from test_pipeline import FakeEncoder  # deterministic token embeddings per prompt
from torch.utils.flop_counter import FlopCounterMode

from difflab.cli.main import main
from difflab.conditioning import GuidanceCond, TextCond
from difflab.config import from_dict
from difflab.networks import DIT_SIZES, DiT, DiTConfig, build_network, count_parameters
from difflab.networks.dit_layers import patchify, sincos_position_embedding, unpatchify
from difflab.pipeline import Pipeline
from difflab.recipes import TrainConfig

TINY = dict(in_channels=1, image_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread (thread start-up dominates on a shared CPU)."""


def randomized(net: torch.nn.Module, seed: int = 0, skip: str = "") -> torch.nn.Module:
    """Every parameter (except names containing ``skip``, if given) drawn at random: the
    zero-initialised layers would make every output 0 and every comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not (skip and skip in name):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net


def text(batch: int, length: int, dim: int = 8, seed: int = 0, pad: int = 0) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.cat([torch.randn(batch, length, dim, generator=g),
                        torch.randn(batch, pad, dim)], dim=1)  # padding: anything
    mask = torch.ones(batch, length + pad, dtype=torch.bool)
    mask[:, length:] = False
    return TextCond(tokens, mask)


# -- patches and positions ---------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_unpatchify_round_trip_and_layout(p):
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (8 // p) * (12 // p), p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 8, 12), x)
    t = torch.randn_like(tokens)
    assert torch.equal(patchify(unpatchify(t, p, 8, 12), p), t)
    # token k is the patch at grid (k // w, k % w), features (row, column, channel)
    k, w = 5, 12 // p
    i, j = divmod(k, w)
    patch = x[1, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [C, p, p]
    assert torch.equal(tokens[1, k], patch.permute(1, 2, 0).reshape(-1))
    with pytest.raises(ValueError, match="patch_size=4"):
        patchify(torch.randn(1, 1, 6, 8), 4)


def test_patch_embedding_is_the_papers_strided_convolution():
    """A Linear on patchify's tokens is a conv with kernel = stride = p (DiT's patch embed)."""
    net = DiT(DiTConfig(**{**TINY, "in_channels": 3, "patch_size": 4}))
    x = torch.randn(2, 3, 8, 8)
    lin = net.patch_embed
    weight = lin.weight.reshape(-1, 4, 4, 3).permute(0, 3, 1, 2)  # [D, C, p, p]
    conv = F.conv2d(x, weight, lin.bias, stride=4).flatten(2).transpose(1, 2)  # [B, N, D]
    torch.testing.assert_close(lin(patchify(x, 4)), conv, rtol=1e-5, atol=1e-5)


def test_sincos_position_embedding():
    pos = sincos_position_embedding(8, 2, 3)  # [6, 8]: half for the row, half for the column
    assert pos.shape == (6, 8)
    row, col = pos[:, :4], pos[:, 4:]
    assert torch.equal(row[0], row[2]) and not torch.equal(row[0], row[3])  # same row 0
    assert torch.equal(col[0], col[3]) and not torch.equal(col[0], col[1])  # same column 0
    # position 0: sin 0 = 0, cos 0 = 1; position 1 at the first frequency (1): sin 1, cos 1
    assert pos[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    w = torch.tensor([1.0, 1e-2])  # frequencies 10000^(-k / 2), k = 0, 1
    torch.testing.assert_close(pos[1, 4:], torch.cat([w.sin(), w.cos()]))  # column 1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(6, 2, 2)


# -- adaLN-Zero ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"num_classes": 3}, {"context_dim": 8},
                                   {"num_classes": 3, "guidance_embedding": True}])
def test_every_block_is_the_identity_and_the_output_zero_at_initialisation(extra):
    net = DiT(DiTConfig(**TINY, **extra))
    x = torch.randn(3, 1, 8, 8)
    tokens = torch.randn(3, 16, 16)
    c = torch.randn(3, 16)
    ctx = text(3, 4) if "context_dim" in extra else None
    for block in net.blocks:
        assert torch.equal(block(tokens, c, ctx), tokens)
    cond = ctx if ctx is not None else (torch.tensor([0, 1, 3]) if extra else None)
    if extra.get("guidance_embedding"):
        cond = GuidanceCond(cond, torch.tensor([1.0, 2.0, 3.0]))
    out = net(x, torch.rand(3) * 1000, cond)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))


def test_first_gradient_reaches_only_the_final_linear():
    """adaLN-Zero: every gate and the final projection are 0, so on the first step only the
    final Linear gets a gradient (the blocks start learning from the second step on)."""
    net = DiT(DiTConfig(**TINY, num_classes=3))
    net(torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 3])).sum().backward()
    for name, p in net.named_parameters():
        nonzero = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert nonzero == name.startswith("final.linear"), name


# -- shapes and conditioning ----------------------------------------------------------------
def test_learned_variance_output_and_other_sizes():
    net = randomized(DiT(DiTConfig(**{**TINY, "in_channels": 3, "out_channels": 6})))
    assert net(torch.randn(2, 3, 8, 8), torch.rand(2)).shape == (2, 6, 8, 8)
    # a size other than the nominal one: the position embedding is computed for its grid
    assert net(torch.randn(2, 3, 12, 16), torch.tensor(3.0)).shape == (2, 6, 12, 16)
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        net(torch.randn(2, 3, 7, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(torch.randn(2, 1, 8, 8), torch.rand(2))


def test_class_conditioning_and_the_null_label():
    net = randomized(DiT(DiTConfig(**TINY, num_classes=3)))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        a, b = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
        null = net(x, t, torch.tensor([3, 3]))
        assert not torch.allclose(a, b) and not torch.allclose(a, null)
        assert torch.equal(net(x, t, None), null)  # None = the null label
        assert torch.equal(net(x, t, torch.tensor([0, 1]))[1], b[1])  # per-sample labels
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        net(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="without num_classes"):
        randomized(DiT(DiTConfig(**TINY)))(x, t, torch.tensor([0, 1]))


def test_text_cross_attention():
    net = randomized(DiT(DiTConfig(**TINY, context_dim=8)))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2) * 1000
    with torch.no_grad():
        out = net(x, t, text(2, 3))
        assert out.shape == (2, 1, 8, 8)
        # padding tokens are masked out; another prompt gives another output
        torch.testing.assert_close(net(x, t, text(2, 3, pad=4)), out, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(net(x, t, text(2, 3, seed=1)), out)
        assert net(x, t, None).shape == (2, 1, 8, 8)  # no prompt at all
    with pytest.raises(ValueError, match="without context_dim"):
        randomized(DiT(DiTConfig(**TINY, num_classes=3)))(x, t, text(2, 3))
    with pytest.raises(ValueError, match="class- or text-conditional"):
        DiTConfig(**TINY, num_classes=3, context_dim=8)


def test_guidance_embedding_starts_at_zero():
    net = randomized(DiT(DiTConfig(**TINY, num_classes=3, guidance_embedding=True)),
                     skip="guidance_mlp.2")
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        one = net(x, t, GuidanceCond(y, torch.ones(2)))
        assert torch.equal(net(x, t, GuidanceCond(y, torch.full((2,), 7.0))), one)
    with pytest.raises(ValueError, match="guidance scale as an input"):
        net(x, t, y)
    with pytest.raises(ValueError, match="without guidance_embedding"):
        DiT(DiTConfig(**TINY, num_classes=3))(x, t, GuidanceCond(y, torch.ones(2)))


def test_gradient_checkpointing_gives_the_same_gradients():
    net = randomized(DiT(DiTConfig(**TINY, num_classes=3)))
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])
    grads = []
    for on in (False, True):
        net.zero_grad()
        net.grad_checkpointing = on
        net(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# -- the paper's sizes ----------------------------------------------------------------------
@pytest.mark.parametrize("size,params_m,gflops", [("S", 33, [6.06, 1.41, 0.36]),
                                                  ("B", 130, [23.01, 5.56, 1.42])])
def test_presets_match_the_papers_parameters_and_gflops(size, params_m, gflops):
    """DiT Table 1 (ImageNet 256: 32x32x4 latents, 1000 classes, learned variance): the
    parameter count in millions and the forward Gflops (multiply-adds) of /2, /4, /8."""
    for p, expected in zip((2, 4, 8), gflops, strict=True):
        cfg = DiTConfig(in_channels=4, out_channels=8, image_size=32, patch_size=p,
                        num_classes=1000, **DIT_SIZES[size])
        with torch.device("meta"):
            net = DiT(cfg)
            net.check_labels = False
            counter = FlopCounterMode(display=False)
            with counter:
                net(torch.zeros(1, 4, 32, 32), torch.zeros(1),
                    torch.zeros(1, dtype=torch.long))
        assert counter.get_total_flops() / 2e9 == pytest.approx(expected, abs=0.006)
        if p == 2:
            assert round(count_parameters(net) / 1e6) == params_m


# -- configs ---------------------------------------------------------------------------------
def test_config_json_round_trip_and_registry():
    cfg = DiTConfig(**TINY, out_channels=2, num_classes=10, mlp_ratio=2.0)
    back = from_dict(DiTConfig, json.loads(json.dumps(asdict(cfg))))
    assert back == cfg
    net = build_network("dit", json.loads(json.dumps(asdict(cfg))))
    assert isinstance(net, DiT) and net.config == cfg
    net.load_state_dict(DiT(cfg).state_dict())  # the position embedding is not a weight
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        DiTConfig(**{**TINY, "patch_size": 3})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig(**{**TINY, "num_heads": 3})


def test_run_config_presets_and_round_trip():
    c = TrainConfig.from_values({"network.name": "dit", "network.dit_size": "S",
                                 "network.dit.depth": 2, "data.resolution": 16,
                                 "network.dit.patch_size": 4})
    d = c.network.dit
    assert (d.hidden_size, d.depth, d.num_heads, d.patch_size, d.image_size) == (384, 2, 6, 4,
                                                                                  16)
    assert c.network.unet.base_channels == 32  # the U-Net preset is untouched
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    b = TrainConfig.from_values({"network": {"name": "dit", "dit_size": "B"}})
    assert (b.network.dit.hidden_size, b.network.dit.num_heads) == (768, 12)
    # the old flat key num_heads (written before the DiT existed) is the U-Net's
    assert TrainConfig.from_values({"num_heads": 2}).network.unet.num_heads == 2
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        TrainConfig.from_values({"network.name": "dit", "network.dit.patch_size": 3})


# -- the CLI and the pipeline ----------------------------------------------------------------
DIT_ARGS = ["--network", "dit", "--dit-hidden-size", "32", "--dit-depth", "2", "--dit-heads",
            "2", "--batch-size", "16", "--sample-every", "0", "--sample-steps", "2",
            "--device", "cpu", "--no-progress"]


def test_help_lists_the_dit_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--network {unet,mlp,dit}", "--dit-size", "--patch-size", "--dit-hidden-size",
                 "--dit-depth", "--dit-heads", "--dit-mlp-ratio"):
        assert flag in out


def test_train_on_digits_and_sample_through_the_pipeline(tmp_path, capsys):
    run = tmp_path / "dit"
    assert main(["train", *DIT_ARGS, "--steps", "20", "--out-dir", str(run)]) == 0
    pipe = Pipeline.from_pretrained(run, device="cpu")
    net = pipe.networks[0]
    assert isinstance(net, DiT) and net.config.num_classes == 10
    assert (net.config.hidden_size, net.config.patch_size, net.config.image_size) == (32, 2, 8)
    out = pipe(labels=[3, 7, 7, 0], guidance=2.0, steps=3, seed=0)
    assert out.samples.shape == (4, 1, 8, 8) and torch.isfinite(out.samples).all()
    assert bool((out.samples.abs() <= 1).all())  # clipped to the data range
    again = Pipeline.from_pretrained(run, device="cpu")(labels=[3, 7, 7, 0], guidance=2.0,
                                                        steps=3, seed=0)
    assert torch.equal(again.samples, out.samples)
    capsys.readouterr()
    assert main(["train", *DIT_ARGS, "--steps", "1", "--patch-size", "3",
                 "--out-dir", str(tmp_path / "bad")]) == 2
    assert "patch_size=3 must divide" in capsys.readouterr().err


def test_text_conditional_learned_variance_run(tmp_path, monkeypatch):
    monkeypatch.setattr("difflab.text.TextEncoder", FakeEncoder)
    run = tmp_path / "text"
    assert main(["train", *DIT_ARGS, "--dataset", "shapes", "--resolution", "16",
                 "--patch-size", "4", "--objective", "hybrid", "--steps", "2",
                 "--out-dir", str(run)]) == 0
    pipe = Pipeline.from_pretrained(run, device="cpu")
    cfg = pipe.networks[0].config
    assert (cfg.context_dim, cfg.num_classes, cfg.in_channels, cfg.out_channels) == (8, None, 3, 6)
    out = pipe(2, prompt=["a red circle"], guidance=2.0, steps=2, seed=0)
    assert out.samples.shape == (2, 3, 16, 16) and torch.isfinite(out.samples).all()
