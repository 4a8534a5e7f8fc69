"""The autoencoder recipe (``difflab train-autoencoder``): PSNR's closed form, a reconstruction
bound after a short fit, the latent scale factor's unit variance, the discriminator's start,
the one-backward split of the two players' gradients, the checkpoint's metadata and reload,
the CLI with resume, VQ, and one-line errors."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from difflab.cli.main import main
from difflab.data import ImageData, load_digits
from difflab.io import load_state
from difflab.networks import build_network
from difflab.networks.autoencoder import Autoencoder, AutoencoderConfig
from difflab.networks.patch_discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from difflab.recipes.autoencoder import (
    AutoencoderRecipe,
    AutoencoderTrainConfig,
    estimate_latent_scale,
    psnr,
)
from difflab.recipes.autoencoder_loss import AutoencoderPair, LossWeights, PairStep
from difflab.training.checkpoint import load_checkpoint, sub_dict


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


TINY = dict(block_out_channels=(16, 16), norm_num_groups=8, layers_per_block=1,
            latent_channels=4, mid_attention=False)


def tiny_ae(seed=0, channels=1, **kw):
    torch.manual_seed(seed)
    return Autoencoder(AutoencoderConfig(in_channels=channels, **{**TINY, **kw}))


def tiny_pair(seed=0, channels=1):
    ae = tiny_ae(seed, channels)
    torch.manual_seed(seed + 1)
    return AutoencoderPair(ae, PatchDiscriminator(PatchDiscriminatorConfig(channels, 8, 2)))


@pytest.fixture(scope="module")
def digits():
    d = load_digits(8, split="train")
    return ImageData(d.images[::8].contiguous())  # 180 grey 8x8 images


def config(tmp_path, steps=4, **groups):
    c = AutoencoderTrainConfig.from_dict({
        "data": {"dataset": "digits", "resolution": 8},
        "network": dict(TINY, block_out_channels=[16, 16]),
        "loss": {"disc_weight": 0.0, "discriminator": {"channels": 8, "layers": 2}},
        "latent": {"scale_images": 100},
        "optim": {"steps": steps, "batch_size": 16, "lr": 2e-3, "warmup_steps": 0},
        "run": {"out_dir": str(tmp_path / "run"), "sample_every": 0, "checkpoint_every": 0,
                "device": "cpu", "log_every": 2},
    })
    for name, changes in groups.items():
        c = replace(c, **{name: replace(getattr(c, name), **changes)})
    return c


def test_psnr_is_ten_log10_of_four_over_the_mse():
    x = torch.zeros(2, 3, 4, 4)
    y = x + torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)
    assert torch.allclose(psnr(x, y), 10 * torch.log10(4 / torch.tensor([0.01, 0.25])))
    assert psnr(x, x + 2).tolist() == pytest.approx([0.0, 0.0])  # the full range: 0 dB


def test_config_round_trips_through_json():
    c = AutoencoderTrainConfig()
    c = replace(c, network=replace(c.network, regularizer="vq"))
    assert AutoencoderTrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_short_fit_reconstructs_far_better_than_the_mean_image(tmp_path, digits):
    data = ImageData(digits.images[::2][:64].contiguous())
    c = config(tmp_path, steps=100, loss={"reconstruction": "l2"},
               optim={"lr": 5e-3, "batch_size": 16, "ema_decay": 0.9, "grad_clip": 0.0})
    recipe = AutoencoderRecipe(c, data=data)
    recipe.run(progress=False)
    x = data.images
    trivial = float(psnr(x, x.mean(0, keepdim=True).expand_as(x)).mean())  # ~11.3 dB
    got = recipe.held_out_psnr()  # no test split given: the training images (~19.5 dB)
    assert not recipe.held_out and got > trivial + 6, (got, trivial)


@pytest.mark.parametrize("posterior", ["mean", "sample"])
def test_scale_factor_gives_unit_variance_on_its_images(posterior):
    ae = tiny_ae(channels=3)
    x = torch.rand(40, 3, 8, 8) * 2 - 1
    scale, shift = estimate_latent_scale(ae, x, posterior=posterior, shift=True,
                                         max_images=30, batch_size=7)
    with torch.no_grad():
        q = ae.eval().encode(x[:30])
    m = q.mean.double()
    assert shift == pytest.approx(float(m.mean()))
    var = ((m - shift) * scale).pow(2).mean()
    if posterior == "sample":  # the variance of z = mean + sigma eps, over eps too
        var = var + (q.logvar.double().exp() * scale**2).mean()
    assert float(var) == pytest.approx(1.0, rel=1e-6)  # float32 encodings in other batches
    # no shift: the same (centred) scale; images past max_images are not read
    x2 = torch.cat([x[:30], torch.zeros(10, 3, 8, 8)])
    s2, sh2 = estimate_latent_scale(ae, x2, posterior=posterior, max_images=30)
    assert sh2 == 0.0 and s2 == pytest.approx(scale, rel=1e-6)
    # sampled latents scaled by it have unit variance too (Monte Carlo, 64 draws each)
    if posterior == "sample":
        g = torch.Generator().manual_seed(0)
        z = torch.cat([q.sample(g) for _ in range(64)]).double()
        assert float(((z - shift) * scale).var()) == pytest.approx(1.0, abs=0.03)


def test_discriminator_is_off_before_disc_start():
    pair, x = tiny_pair(), torch.rand(4, 1, 8, 8) * 2 - 1
    w = LossWeights(kl_weight=1e-3)
    loss, terms = pair(x, w, PairStep(False, torch.Generator().manual_seed(3)))
    rec, q = pair.autoencoder(x, generator=torch.Generator().manual_seed(3))
    expected = (rec - x).abs().flatten(1).mean(1) + 1e-3 * q.reg_loss / 64
    assert torch.equal(loss, expected)
    loss.sum().backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in pair.discriminator.parameters())
    on, _ = pair(x, w, PairStep(True, torch.Generator().manual_seed(3)))
    assert not torch.allclose(on, expected)


def test_one_backward_gives_each_player_the_gradient_of_its_own_loss():
    pair, x = tiny_pair(), torch.rand(6, 1, 8, 8) * 2 - 1
    w = LossWeights(kl_weight=1e-2, disc_weight=0.7)
    loss, terms = pair(x, w, PairStep(True, torch.Generator().manual_seed(5)))
    loss.sum().backward()
    split = {k: p.grad.clone() for k, p in pair.named_parameters()}

    # reference: each player's own loss alone, written plainly (no detaching tricks)
    ref = tiny_pair()
    ae, d = ref.autoencoder, ref.discriminator
    rec, q = ae(x, generator=torch.Generator().manual_seed(5))
    l_rec = (rec - x).abs().flatten(1).mean(1)
    g_adv = -d(rec).flatten(1).mean(1)
    last = ae.decoder.conv_out.weight
    (gr,) = torch.autograd.grad(l_rec.mean(), last, retain_graph=True)
    (ga,) = torch.autograd.grad(g_adv.mean(), last, retain_graph=True)
    lam = 0.7 * (gr.norm() / (ga.norm() + 1e-6)).clamp(0, 1e4).detach()
    assert torch.allclose(terms["d_weight"], lam)
    loss_g = (l_rec + 1e-2 * q.reg_loss / 64 + lam * g_adv).sum()
    grads_g = torch.autograd.grad(loss_g, list(ae.parameters()), retain_graph=True)
    fake = rec.detach()
    loss_d = 0.5 * (F.relu(1 - d(x)).flatten(1).mean(1)
                    + F.relu(1 + d(fake)).flatten(1).mean(1)).sum()
    grads_d = torch.autograd.grad(loss_d, list(d.parameters()))
    names = ([f"autoencoder.{k}" for k, _ in ae.named_parameters()]
             + [f"discriminator.{k}" for k, _ in d.named_parameters()])
    for name, g in zip(names, grads_g + grads_d, strict=True):
        scale = float(g.abs().max()) + 1e-12
        assert torch.allclose(split[name], g, atol=1e-5 * scale, rtol=1e-4), name
    assert all(g.abs().sum() > 0 for g in grads_d[:1]) and grads_g[-1].abs().sum() > 0


def test_checkpoint_meta_reloads_the_same_autoencoder(tmp_path, digits):
    recipe = AutoencoderRecipe(config(tmp_path, steps=3, loss={"disc_weight": 0.5,
                                                               "disc_start": 1}), data=digits)
    result = recipe.run(progress=False)
    tensors, meta = load_checkpoint(result["checkpoint"])
    m = meta["autoencoder"]
    assert {"network", "network_config", "sample_shape", "data_range", "scale_factor",
            "shift_factor", "weights_prefix"} <= set(m)
    assert m["network"] == "autoencoder" and m["sample_shape"] == [1, 8, 8]
    assert m["data_range"] == [-1.0, 1.0] and m["shift_factor"] == 0.0
    assert meta["dataset"] == "digits" and meta["config"]["optim"]["steps"] == 3
    assert m["scale_factor"] == pytest.approx(recipe.latent_scale()[0])
    ae = build_network(m["network"], m["network_config"])
    load_state(ae, sub_dict(tensors, f"ema.{m['weights_prefix']}"), "checkpoint")
    x = digits.images[:5]
    with torch.no_grad():
        a = ae.eval().decode(ae.encode(x).mode())
        b = recipe.autoencoder.decode(recipe.autoencoder.encode(x).mode())
    state = recipe.autoencoder.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ae.state_dict().items())
    assert torch.allclose(a, b, atol=1e-5)  # channels-last vs contiguous convolutions
    # the scale is the loaded encoder's own: no data needed to reproduce it
    s, _ = estimate_latent_scale(ae, digits.images, max_images=100)
    assert s == pytest.approx(m["scale_factor"], rel=1e-6)


def test_vq_autoencoder_trains_and_stores_a_scale(tmp_path, digits):
    c = config(tmp_path, steps=4, loss={"disc_weight": 0.5, "disc_start": 2})
    c = replace(c, network=replace(c.network, regularizer="vq", codebook_size=32))
    recipe = AutoencoderRecipe(c, data=digits)
    result = recipe.run(progress=False)
    _, meta = load_checkpoint(result["checkpoint"])
    assert meta["autoencoder"]["network_config"]["regularizer"] == "vq"
    assert math.isfinite(meta["autoencoder"]["scale_factor"])
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"rec", "reg", "psnr", "g_adv", "d_adv", "d_weight"} <= set(rows[-1])
    assert rows[-1]["d_weight"] > 0 and rows[1]["d_weight"] == 0  # off at steps 0-1


ARGS = ["train-autoencoder", "--dataset", "digits", "--resolution", "8", "--no-progress",
        "--block-out-channels", "16", "16", "--norm-num-groups", "8", "--no-mid-attention",
        "--disc-channels", "8", "--disc-layers", "2", "--disc-start", "2",
        "--batch-size", "8", "--scale-images", "64", "--device", "cpu", "--log-every", "2"]


def test_cli_run_and_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main([*ARGS, "--steps", "2", "--checkpoint-every", "2", "--out-dir", run]) == 0
    assert main([*ARGS, "--steps", "4", "--out-dir", run, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "held-out (test split) PSNR:" in out
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.json"))
    assert ckpts == ["step_00000002.json", "step_00000004.json"]
    assert (tmp_path / "run" / "samples" / "step_00000004.png").is_file()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "psnr" in r] == [2, 4]
    assert any("test_psnr" in r for r in rows)
    # the resumed run is the uninterrupted one
    full = str(tmp_path / "full")
    assert main([*ARGS, "--steps", "4", "--out-dir", full]) == 0
    a, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.json")
    b, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000004.json")
    for k in sub_dict(a, "ema"):
        assert torch.equal(a[f"ema.{k}"], b[f"ema.{k}"]), k


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_cli_config_file_below_command_line(tmp_path):
    cfg = tmp_path / "ae.toml"
    cfg.write_text('"optim.lr" = 3e-3\n[loss]\nkl_weight = 1e-4\ndisc_weight = 0.0\n')
    run = tmp_path / "run"
    assert main([*ARGS, "--config", str(cfg), "--kl-weight", "2e-4", "--steps", "1",
                 "--out-dir", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["optim"]["lr"] == 3e-3 and saved["loss"]["kl_weight"] == 2e-4
    assert saved["loss"]["disc_weight"] == 0.0 and saved["optim"]["warmup_steps"] == 0


def test_cli_vq_run(tmp_path, capsys):
    run = tmp_path / "vq"
    assert main([*ARGS, "--regularizer", "vq", "--codebook-size", "16", "--steps", "3",
                 "--out-dir", str(run)]) == 0
    _, meta = load_checkpoint(run / "checkpoints" / "step_00000003.json")
    assert meta["autoencoder"]["network_config"]["codebook_size"] == 16
    assert "PSNR:" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--disc-layers", "4"], "--disc-layers 4 needs images of at least 16 px"),
    (["--dataset", "toy:moons"], "needs images"),
    (["--norm-num-groups", "5"], "norm_num_groups"),
    (["--block-out-channels", *["16"] * 5], "not a multiple of the down-sampling factor 16"),
    (["--reconstruction", "l3"], "invalid choice"),
    (["--kl-weight", "-1"], "must be >= 0"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, extra, message):
    assert exit_code([*ARGS, "--steps", "1", "--out-dir", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_resume_refuses_a_changed_network(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main([*ARGS, "--steps", "1", "--out-dir", run]) == 0
    assert main([*ARGS, "--steps", "2", "--out-dir", run, "--resume", "--latent-channels",
                 "2"]) == 2
    assert "cannot change ['latent_channels']" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_run_matches_the_single_process_run(tmp_path):
    """Under torchrun (2 CPU processes) the posterior noise is drawn for the global batch and
    the adaptive weight from the global batch's gradients: the same run as one process."""
    import os
    import subprocess
    import sys

    args = [*ARGS[1:], "--steps", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "difflab", "train-autoencoder", *args, "--out-dir", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train-autoencoder", *args, "--out-dir", str(tmp_path / "one")]) == 0
    a, _ = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_00000004.json")
    b, _ = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000004.json")
    for k in sub_dict(a, "ema"):
        assert torch.allclose(a[f"ema.{k}"], b[f"ema.{k}"], atol=1e-5), k


def test_a_trained_run_is_a_latent_space_for_diffusion(tmp_path, digits, capsys):
    """The pipeline loads the run as an autoencoder stage (its EMA weights and scale), and a
    latent diffusion model trains and samples on it."""
    from difflab.pipeline import Pipeline, load_autoencoder

    recipe = AutoencoderRecipe(config(tmp_path, steps=2), data=digits)
    ckpt = recipe.run(progress=False)["checkpoint"]
    stage, ae = load_autoencoder(ckpt)
    assert stage.scale_factor == pytest.approx(recipe.latent_scale()[0])
    assert stage.sample_shape == [1, 8, 8]
    x = digits.images[:4]
    with torch.no_grad():
        a = ae.decode(ae.encode(x).mode())
        b = recipe.autoencoder.decode(recipe.autoencoder.encode(x).mode())
    assert torch.allclose(a, b, atol=1e-5)
    assert main(["train", "--autoencoder", ckpt, "--dataset", "digits",
                 "--base-channels", "8", "--channel-mult", "1", "--attention-resolutions",
                 "--steps", "2", "--batch-size", "4", "--sample-every", "0", "--sample-steps",
                 "2", "--out-dir", str(tmp_path / "ldm"), "--no-progress"]) == 0
    out = Pipeline.from_pretrained(tmp_path / "ldm")(sampler="ddim", steps=2, seed=0)
    assert out.samples.shape[1:] == (1, 8, 8) and out.samples.isfinite().all()


def test_the_run_folder_itself_loads_as_an_autoencoder(tmp_path, digits):
    from difflab.pipeline import load_autoencoder

    AutoencoderRecipe(config(tmp_path, steps=1), data=digits).run(progress=False)
    stage, _ = load_autoencoder(tmp_path / "run")
    assert stage.kind == "autoencoder"
