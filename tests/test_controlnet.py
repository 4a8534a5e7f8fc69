"""ControlNet (Zhang et al. 2023): zero convolutions leave a fresh ControlNet's base bit for bit
unchanged (class and text U-Nets, through classifier-free guidance, at scale 0); the encoder is
an exact copy; several ControlNets' residuals add; training changes the ControlNet only; a run
loads as base + ControlNet and samples with any sampler and guidance; control images."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from difflab.cli.main import main
from difflab.conditioning import TextCond
from difflab.config import from_dict, to_dict
from difflab.data import DataError, ImageData
from difflab.data.control import (
    control_image,
    edges,
    foreground_mask,
    read_control_image,
    save_control_image,
)
from difflab.guidance import ClassifierFreeGuidance
from difflab.networks import ControlledUNet, ControlNet, UNet, UNetConfig, build_network
from difflab.networks.controlnet import batch_hint
from difflab.parameterization import Denoiser
from difflab.pipeline import Pipeline
from difflab.process import make_process
from difflab.recipes.controlnet import ControlNetRecipe, ControlNetTrainConfig
from difflab.training import resolve_checkpoint
from difflab.training.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(4,), num_heads=2)


@torch.no_grad()
def randomized(net: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised layers would make comparisons
    vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(std * torch.randn(p.shape, generator=g))
    return net.eval()


def base_unet(**kw) -> UNet:
    return randomized(UNet(UNetConfig(**{**TINY, **kw})), 0)


def inputs(batch=3, channels=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, 8, 8, generator=g)
    return x, torch.rand(batch, generator=g) * 1000, torch.rand(batch, 1, 8, 8, generator=g)


def text_cond(batch, dim=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 4, dtype=torch.bool)
    mask[0, 2:] = False
    return TextCond(torch.randn(batch, 4, dim, generator=g), mask)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_fresh_controlnet_leaves_the_base_bit_identical(kind):
    cfg = dict(num_classes=3) if kind == "class" else dict(context_dim=6)
    base = base_unet(**cfg)
    x, c, hint = inputs()
    labels = torch.tensor([0, 2, 3]) if kind == "class" else text_cond(3)
    cn = ControlNet.from_unet(base, 1).eval()
    # the encoder copy is active (random base weights), only the zero convs make it silent
    assert cn(x, c, labels, hint).middle.abs().max() == 0
    with torch.no_grad():
        ref = base(x, c, labels)
        out = ControlledUNet(base, [(cn, 1.0)], [hint])(x, c, labels)
        two = ControlledUNet(base, [(cn, 1.0), (cn, 0.5)], [hint, hint[:1]])(x, c, labels)
    assert torch.equal(out, ref) and torch.equal(two, ref)
    assert ref.abs().max() > 0


def test_fresh_controlnet_through_classifier_free_guidance():
    base = base_unet(num_classes=3)
    process = make_process("linear", T=1000)
    x, _, hint = inputs()
    t = torch.tensor([0.3, 0.5, 0.8])
    y = torch.tensor([0, 1, 2])
    net = ControlledUNet(base, [(ControlNet.from_unet(base, 1).eval(), 1.0)], [hint])
    with torch.no_grad():
        ref = ClassifierFreeGuidance(Denoiser(base, process, "eps"), 3.0, null_label=3)(x, t, y)
        out = ClassifierFreeGuidance(Denoiser(net, process, "eps"), 3.0, null_label=3)(x, t, y)
    assert torch.equal(out.eps, ref.eps) and torch.equal(out.x0, ref.x0)


def test_scale_zero_is_the_base_and_a_trained_controlnet_steers():
    base = base_unet(num_classes=3)
    x, c, hint = inputs()
    y = torch.tensor([0, 1, 3])
    cn = randomized(ControlNet.from_unet(base, 1), 5, std=0.1)
    with torch.no_grad():
        ref = base(x, c, y)
        assert torch.equal(ControlledUNet(base, [(cn, 0.0)], [None])(x, c, y), ref)
        on = ControlledUNet(base, [(cn, 1.0)], [hint])
        a = on(x, c, y)
        on.set_hints([1 - hint])
        b = on(x, c, y)
    assert (a - ref).abs().max() > 1e-3 and (a - b).abs().max() > 1e-3


def test_unet_residuals():
    base = base_unet(num_classes=3)
    x, c, _ = inputs()
    y = torch.tensor([0, 1, 3])
    n_skips = 1 + len(base.down)
    with torch.no_grad():
        ref = base(x, c, y)
        assert torch.equal(base(x, c, y, skip_residuals=None, middle_residual=None), ref)
        zeros = [torch.zeros(1) for _ in range(n_skips)]
        assert torch.equal(base(x, c, y, skip_residuals=zeros, middle_residual=torch.zeros(1)),
                           ref)
        # a middle residual is the middle block's output plus it (a hook doing the same)
        r = torch.randn(3, 16, 4, 4)
        handle = base.middle.register_forward_hook(lambda m, i, out: out + r)
        hooked = base(x, c, y)
        handle.remove()
        assert torch.equal(base(x, c, y, middle_residual=r), hooked)
        with pytest.raises(ValueError, match="skip residuals"):
            base(x, c, y, skip_residuals=zeros[:-1])


def test_from_unet_copies_the_encoder_exactly_and_the_config_round_trips():
    base = base_unet(context_dim=6)
    cn = ControlNet.from_unet(base, 3, control="mask")
    own = cn.encoder.state_dict()
    theirs = base.state_dict()
    assert set(own) == {k for k in theirs if not k.startswith(("up.", "out."))}
    assert all(torch.equal(own[k], theirs[k]) for k in own)
    assert own["down.0.0.conv1.weight"].data_ptr() != theirs["down.0.0.conv1.weight"].data_ptr()
    assert all(p.requires_grad for p in cn.parameters())
    again = build_network("controlnet", json.loads(json.dumps(asdict(cn.config))))
    assert again.config == cn.config and again.config.unet == base.config


def test_two_controlnets_residuals_add():
    base = base_unet(num_classes=3)
    x, c, h1 = inputs()
    h2 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    y = torch.tensor([0, 1, 3])
    a = randomized(ControlNet.from_unet(base, 1), 5, std=0.1)
    b = randomized(ControlNet.from_unet(base, 1), 6, std=0.1)
    with torch.no_grad():
        out = ControlledUNet(base, [(a, 0.7), (b, -1.3)], [h1, h2])(x, c, y)
        ra, rb = a(x, c, y, h1), b(x, c, y, h2.expand(3, -1, -1, -1))
        skips = [0.7 * p + -1.3 * q for p, q in zip(ra.skips, rb.skips, strict=True)]
        ref = base(x, c, y, skip_residuals=skips,
                   middle_residual=0.7 * ra.middle + -1.3 * rb.middle)
    assert torch.equal(out, ref)


def test_per_sample_control_images_and_guidance_rows():
    base = base_unet(num_classes=3)
    cn = randomized(ControlNet.from_unet(base, 1), 5, std=0.1)
    process = make_process("linear", T=1000)
    x, _, hint = inputs(2)
    t, y = torch.tensor([0.4, 0.7]), torch.tensor([0, 2])
    net = ControlledUNet(base, [(cn, 1.0)], [hint])
    den = Denoiser(net, process, "eps")
    with torch.no_grad():
        both = ClassifierFreeGuidance(den, 2.5, null_label=3)(x, t, y).eps
        apart = ClassifierFreeGuidance(den, 2.5, null_label=3, batched=False)(x, t, y).eps
        rows = []
        for i in range(2):  # each sample alone with its own control image
            net.set_hints([hint[i:i + 1]])
            rows.append(ClassifierFreeGuidance(den, 2.5, null_label=3)(
                x[i:i + 1], t[i:i + 1], y[i:i + 1]).eps)
    torch.testing.assert_close(both, apart, rtol=0, atol=1e-5)
    torch.testing.assert_close(both, torch.cat(rows), rtol=0, atol=1e-5)
    assert batch_hint(hint, 4).shape[0] == 4 and batch_hint(hint[:1], 5).shape[0] == 5
    with pytest.raises(ValueError, match="2 control images for a batch of 3"):
        batch_hint(hint, 3)


def test_control_images():
    img = -torch.ones(2, 3, 12, 12)
    img[0, 0, 3:8, 4:9] = 1.0  # a red rectangle on black
    img[1, 2, 0:4, 0:4] = 0.2  # a blue one, brightest channel 0.6 in [0, 1]
    mask = foreground_mask(img)
    assert mask.shape == (2, 1, 12, 12)
    expect = torch.zeros(2, 1, 12, 12)
    expect[0, 0, 3:8, 4:9] = 1
    expect[1, 0, 0:4, 0:4] = 1
    assert torch.equal(mask, expect) and torch.equal(control_image(img, "mask"), mask)
    e = edges(img, threshold=0.05)
    assert e[0, 0, 5, 6] == 0 and e[0, 0, 0, 0] == 0  # inside and far outside: flat
    assert e[0, 0, 3, 6] == 1 and e[0, 0, 2, 6] == 1  # both sides of the top border
    assert e[0, 0, 5, 4] == 1 and e[0, 0, 5, 3] == 1  # both sides of the left border
    assert e[0].sum() < mask[0].sum() * 2 + 20  # a ring, not a filled area
    with pytest.raises(ValueError, match="unknown control kind 'depth'"):
        control_image(img, "depth")


def test_control_files(tmp_path):
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 2:5, 1:6] = 1
    (path,) = save_control_image(mask, tmp_path)
    assert torch.equal(read_control_image(path, 8), mask)
    assert read_control_image(path, 16, channels=3).shape == (1, 3, 16, 16)
    with pytest.raises(DataError, match="nope.png"):
        read_control_image(tmp_path / "nope.png", 8)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DataError, match="bad.png"):
        read_control_image(tmp_path / "bad.png", 8)


def write_base(folder, classes=("a", "b", "c")):
    """A class-conditional base run folder as the trainer leaves it (random weights)."""
    net = base_unet(num_classes=len(classes))
    process = make_process("linear", T=1000)
    meta = {"config": {"data": {"dataset": "digits"}, "diffusion": {"p_uncond": 0.2}},
            "network": {"name": "unet", "config": asdict(net.config)},
            "process": process.to_config(), "prediction": "eps", "learned_variance": False,
            "sigma_data": 0.5, "data_range": [-1.0, 1.0], "class_names": list(classes),
            "sample_shape": [1, 8, 8]}
    tensors = {f"{p}.{k}": v.clone() for p in ("model", "ema")
               for k, v in net.state_dict().items()}
    save_checkpoint(folder / "checkpoints", 1, tensors, meta)
    return net


def tiny_data(n=8, classes=("a", "b", "c")):
    g = torch.Generator().manual_seed(3)
    x = -torch.ones(n, 1, 8, 8)
    for i in range(n):
        r, c = torch.randint(0, 4, (2,), generator=g).tolist()
        x[i, 0, r:r + 4, c:c + 4] = 1.0
    return ImageData(images=x, labels=torch.arange(n) % len(classes), class_names=list(classes))


def train(tmp_path, steps=2, out="cn", **kw):
    cfg = ControlNetTrainConfig(base=str(tmp_path / "base"), control="mask", **kw)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.lr = steps, 4, 1e-2
    cfg.run.out_dir, cfg.run.device = str(tmp_path / out), "cpu"
    return ControlNetRecipe(cfg, data=tiny_data())


def test_train_config_round_trips_through_json():
    cfg = ControlNetTrainConfig(base="runs/x", control="mask", data="shapes",
                                hint_widths=(8, 8, 16))
    cfg.optim.steps = 7
    again = from_dict(ControlNetTrainConfig, json.loads(json.dumps(to_dict(cfg))), "test")
    assert again == cfg


def test_training_changes_the_controlnet_only(tmp_path):
    base = write_base(tmp_path / "base")
    recipe = train(tmp_path)
    frozen = {k: v.clone() for k, v in recipe.base.net.state_dict().items()}
    start = {k: v.clone() for k, v in recipe.controlnet.state_dict().items()}
    recipe.run(progress=False)
    assert all(torch.equal(v, recipe.base.net.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    now = recipe.controlnet.state_dict()
    assert not torch.equal(now["middle_out.weight"], start["middle_out.weight"])
    assert not torch.equal(now["encoder.down.0.0.conv1.weight"],
                           start["encoder.down.0.0.conv1.weight"])
    assert {id(p) for g in recipe.opt.param_groups for p in g["params"]} == \
        {id(p) for p in recipe.controlnet.parameters()}
    # label dropout: the base's training rate, unless given
    assert recipe.loss.inner.p_uncond == 0.2 and recipe.loss.inner.null_label == 3
    assert train(tmp_path, out="cn2", p_uncond=0.5).loss.inner.p_uncond == 0.5


def test_the_run_loads_as_base_plus_controlnet_and_samples(tmp_path):
    write_base(tmp_path / "base")
    recipe = train(tmp_path)
    recipe.run(progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "cn")
    assert [s.kind for s in pipe.card.stages] == ["diffusion", "controlnet"]
    assert isinstance(pipe.net, ControlledUNet)
    ema = recipe.ema.model.state_dict()
    loaded = pipe.net.controlnets[0].state_dict()
    assert all(torch.equal(ema[k], loaded[k]) for k in ema)
    mask = control_image(tiny_data().images[:1], "mask")
    a = pipe(2, labels=1, sampler="ddim", steps=3, guidance=2.0, control=mask)
    b = pipe(2, labels=1, sampler="dpmpp_2m", steps=3, guidance=2.0, control=mask)
    c = pipe(2, labels=1, sampler="ddim", steps=3, guidance=2.0, control=1 - mask)
    assert torch.isfinite(a.samples).all() and torch.isfinite(b.samples).all()
    assert not torch.equal(a.samples, c.samples)  # the control steers the samples
    per_sample = pipe(2, labels=1, sampler="ddim", steps=3, guidance=2.0, batch_size=1,
                      control=mask.expand(2, -1, -1, -1))
    torch.testing.assert_close(per_sample.samples, a.samples, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 control images for 2 samples"):
        pipe(2, labels=1, steps=2, control=mask.expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match="2 control images given for 1 ControlNets"):
        pipe(2, labels=1, steps=2, control=[mask, mask])
    with pytest.raises(ValueError, match=r"\[K, 1, 8, 8\]"):
        pipe(2, labels=1, steps=2, control=torch.zeros(1, 3, 8, 8))
    saved = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "saved"))
    assert torch.equal(saved(2, labels=1, sampler="ddim", steps=3, guidance=2.0,
                             control=mask).samples, a.samples)
    # a second ControlNet (here the same run again) at scale 0 changes nothing; it needs its
    # own control image
    assert [s.name for s in pipe.load_adapter(tmp_path / "cn", scale=0.0)] == ["controlnet_2"]
    assert len(pipe.net.controlnets) == 2
    with pytest.raises(ValueError, match="1 control images given for 2 ControlNets"):
        pipe(2, labels=1, steps=2, control=mask)
    again = pipe(2, labels=1, sampler="ddim", steps=3, guidance=2.0, control=[mask, 1 - mask])
    assert torch.equal(again.samples, a.samples)
    (png,) = save_control_image(mask, tmp_path / "controls")
    assert main(["sample", "--checkpoint", str(tmp_path / "cn"), "--control", str(png),
                 "--control-scale", "0.5", "--n", "2", "--steps", "2", "--class", "1",
                 "--guidance", "2", "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    assert (tmp_path / "s.png").is_file()
    base_only = Pipeline.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="needs a model with a ControlNet"):
        base_only(2, labels=1, steps=2, control=mask)


def test_cli_errors(tmp_path, capsys):
    assert main(["train-controlnet", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--base is required" in capsys.readouterr().err
    write_base(tmp_path / "base")
    assert main(["sample", "--checkpoint", str(tmp_path / "base"), "--control",
                 str(tmp_path / "c.png"), "--out", str(tmp_path / "s.png")]) == 2
    assert "needs a model with a ControlNet" in capsys.readouterr().err


def pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_cli_edit_runs_under_the_controlnet(tmp_path, capsys):
    write_base(tmp_path / "base")
    train(tmp_path).run(progress=False)
    mask = control_image(tiny_data().images[:1], "mask")
    (png,) = save_control_image(mask, tmp_path / "controls")
    base = ["edit", "sdedit", "--checkpoint", str(tmp_path / "cn"), "--input", str(png),
            "--class", "1", "--steps", "3", "--strength", "0.8", "--device", "cpu",
            "--no-progress"]
    # without a control image: refused before sampling, one line naming --control
    assert main([*base, "--out", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--control" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "none.png").exists()
    outs = {}
    for name, extra in (("on", []), ("off", ["--control-scale", "0"]), ("inverse", [])):
        ctrl = png if name != "inverse" else save_control_image(1 - mask, tmp_path / "inv")[0]
        out = tmp_path / f"{name}.png"
        assert main([*base, "--control", str(ctrl), *extra, "--out", str(out)]) == 0, name
        outs[name] = pixels(out)
    # at scale 0 the edit is the base model's; the control image steers the edit
    assert main(["edit", "sdedit", *base[2:3], str(tmp_path / "base"), *base[4:],
                 "--out", str(tmp_path / "base.png")]) == 0
    assert np.array_equal(outs["off"], pixels(tmp_path / "base.png"))
    assert not np.array_equal(outs["on"], outs["inverse"])
    for kind, extra in (("vary", ["--n", "2"]), ("inpaint", ["--mask", str(png)])):
        assert main([kind if a == "sdedit" else a for a in base] + extra
                    + ["--control", str(png), "--out", str(tmp_path / f"{kind}.png")]) == 0


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_folder(root, classes=("a", "b", "c"), per_class=3):
    """An image folder whose sub-folders are the base's classes (grey squares, 8 px)."""
    from PIL import Image

    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("L", (8, 8), 0)
            img.paste(255, (i, k, i + 4, k + 4))
            img.save(root / name / f"{i}.png")
    return root


def test_cli_config_file_and_a_resumed_run_continues_the_uninterrupted_one(tmp_path, capsys):
    write_base(tmp_path / "base")
    cfg = tmp_path / "cn.toml"
    cfg.write_text('control = "mask"\n[optim]\nbatch_size = 4\nlr = 0.01\n')
    common = ["train-controlnet", "--base", str(tmp_path / "base"), "--config", str(cfg),
              "--data", f"folder:{write_folder(tmp_path / 'imgs')}", "--sample-steps", "1",
              "--device", "cpu", "--no-progress"]
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "straight")]) == 0
    run = str(tmp_path / "cn")
    assert main([*common, "--steps", "1", "--out", run]) == 0
    assert "--control mask" in capsys.readouterr().out  # the file's value is the run's
    for extra, message in [([], "already holds a run"),
                           (["--resume", "--control", "edges"], "cannot change ['control']")]:
        assert main([*common, "--steps", "2", "--out", run, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main([*common, "--steps", "2", "--out", run, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # weights, EMA, optimizer and RNG states as those of the run that was never stopped
    a, meta = load_checkpoint(resolve_checkpoint(tmp_path / "straight"))
    b, _ = load_checkpoint(resolve_checkpoint(tmp_path / "cn"))
    assert meta["step"] == 2 and same_state(a, b)
    first, _ = load_checkpoint(tmp_path / "cn" / "checkpoints" / "step_00000001.json")
    assert not torch.equal(first["model.middle_out.weight"], b["model.middle_out.weight"])
    assert (tmp_path / "cn" / "config.json").is_file()


def test_cli_refuses_a_dit_or_latent_base(tmp_path, capsys):
    from test_finetune import save_latent_base

    from difflab.networks import DiT, DiTConfig
    from difflab.pipeline import ModelCard, StageCard

    dit = DiT(DiTConfig(in_channels=1, image_size=8, patch_size=2, hidden_size=16, depth=1,
                        num_heads=2, num_classes=3))
    stage = StageCard(name="diffusion", network="dit", network_config=asdict(dit.config),
                      sample_shape=[1, 8, 8], weights="", process=make_process("linear")
                      .to_config(), prediction="eps", conditioning="class",
                      class_names=["a", "b", "c"])
    bases = {"needs a U-Net model (this one is a DiT)":
             Pipeline(ModelCard(stages=[stage]), dit.eval()).save_pretrained(tmp_path / "dit"),
             "supports pixel-space models (this one is latent)":
             save_latent_base(tmp_path / "latent", channels=1)}
    for message, base in bases.items():
        assert main(["train-controlnet", "--base", str(base), "--device", "cpu",
                     "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--base {base}: ControlNet training {message}" in err[0], err
    assert not (tmp_path / "out").exists()
