"""Training loop: checkpoint round trip, bitwise resume, EMA warm-up, bad-input errors, CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli.main import main
from difflab.data import load_digits
from difflab.pipeline import Pipeline
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.samplers import ddim
from difflab.samplers.generate import generate
from difflab.training import EMA, NonFiniteLossError

TINY = dict(resolution=8, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[4], num_heads=2, batch_size=8, log_every=2,
            sample_every=0, checkpoint_every=0, sample_steps=4, warmup_steps=2, lr=1e-3,
            dropout=0.1, device="cpu")


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    idx = torch.arange(0, len(d), 9)  # 200 images, all classes
    return type(d)(images=d.images[idx], labels=d.labels[idx], class_names=d.class_names)


def make(tmp_path, digits, name="run", **kw):
    config = TrainConfig.from_values(dict(out_dir=str(tmp_path / name), **(TINY | kw)))
    return DiffusionRecipe(config, data=digits)


def params(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_resume_is_bitwise_identical(tmp_path, digits):
    full = make(tmp_path, digits, "full", steps=6)
    full.run(progress=False)
    part = make(tmp_path, digits, "part", steps=6)
    part.run(steps=3, progress=False)
    resumed = make(tmp_path, digits, "part", steps=6)
    resumed.resume(part.latest_checkpoint())
    assert resumed.step == 3
    resumed.run(progress=False)
    for name, a in params(full.net).items():
        assert torch.equal(a, resumed.net.state_dict()[name]), name
    for name, a in params(full.ema.model).items():
        assert torch.equal(a, resumed.ema.model.state_dict()[name]), name
    s1, s2 = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    # and the logged losses of steps 4..6 agree
    def last_loss(run):
        return json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert last_loss("full") == last_loss("part")


def test_checkpoint_round_trip_gives_same_model_and_samples(tmp_path, digits):
    tr = make(tmp_path, digits, steps=3)
    result = tr.run(progress=False)
    pipe = Pipeline.from_pretrained(result["checkpoint"])
    den = pipe.denoiser(clip=False)
    assert pipe.card.step == 3 and pipe.class_names == [str(i) for i in range(10)]
    for name, a in tr.ema.model.state_dict().items():
        assert torch.equal(a, den.net.state_dict()[name])
    # both sample in channels-last (the CPU's faster layout), so both compute alike
    convs = [m.weight for m in den.net.modules() if isinstance(m, torch.nn.Conv2d)]
    ema_convs = [m.weight for m in tr.ema.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last)
                         for w in convs + ema_convs)
    from difflab.parameterization import Denoiser
    ref = Denoiser(tr.ema.model, tr.process, tr.config.diffusion.prediction)
    labels = torch.arange(4)
    a = generate(ref, ddim, (1, 8, 8), [0, 1, 2, 3], labels=labels, steps=3, progress=False)
    b = generate(den, ddim, (1, 8, 8), [0, 1, 2, 3], labels=labels, steps=3, progress=False)
    assert torch.equal(a, b)
    # per-seed RNG: the same image whatever the batch it is drawn in (up to the float
    # rounding of batch-size-dependent kernels)
    clipped = pipe.denoiser()
    b = generate(clipped, ddim, (1, 8, 8), [0, 1, 2, 3], labels=labels, steps=3,
                 progress=False)
    c = generate(clipped, ddim, (1, 8, 8), [2, 3], labels=labels[2:], steps=3, progress=False,
                 batch_size=1)
    torch.testing.assert_close(b[2:], c, rtol=1e-4, atol=1e-4)
    assert b.abs().max() <= 1


def test_checkpoints_are_safetensors_plus_json_and_pruned(tmp_path, digits):
    tr = make(tmp_path, digits, steps=6, checkpoint_every=2, keep_checkpoints=2)
    tr.run(progress=False)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["step_00000004.json", "step_00000004.safetensors",
                     "step_00000006.json", "step_00000006.safetensors"]
    meta = json.loads((tmp_path / "run" / "checkpoints" / files[2]).read_text())
    assert meta["config"]["optim"]["batch_size"] == 8 and meta["process"]["schedule"] == "cosine"
    assert (tmp_path / "run" / "config.json").exists()


def test_ema_warmup_tracks_early_weights():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9999)
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(20):
        ema.update(net)
    # with warm-up the EMA is close to the new weights; without it, it would barely move
    gap = (ema.model.weight - net.weight).abs().max()
    assert gap < 0.05
    assert ema.current_decay() == pytest.approx(21 / 30)


def test_nan_loss_is_reported_and_nothing_saved(tmp_path, digits):
    tr = make(tmp_path, digits, steps=4, checkpoint_every=2)
    tr.run(steps=2, progress=False)
    with torch.no_grad():
        for p in tr.net.parameters():
            p.fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match="step_00000002"):
        tr.run(progress=False)
    assert [p.name for p in tr.out_dir.joinpath("checkpoints").glob("*.json")] == [
        "step_00000002.json"]


def test_unknown_model_size_and_config_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        TrainConfig.from_values({"stepz": 3})
    with pytest.raises(ValueError, match="model_size = 'huge': expected one of 'tiny'"):
        TrainConfig.from_values(dict(model_size="huge"))


# -- command line ---------------------------------------------------------------------------

def cli_train(tmp_path, *extra):
    args = ["train", "--out-dir", str(tmp_path / "cli"), "--no-progress", "--resolution", "8",
            "--base-channels", "16", "--channel-mult", "1", "2", "--num-res-blocks", "1",
            "--attention-resolutions", "--batch-size", "8", "--sample-steps", "2",
            "--log-every", "1", "--device", "cpu", *extra]
    return main(args)


def test_cli_train_then_sample(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 2, "lr": 0.01, "schedule": "linear"}))
    assert cli_train(tmp_path, "--config", str(cfg), "--lr", "0.005") == 0
    out = capsys.readouterr().out
    assert "sample grid:" in out and "--lr 0.005" in out and "--schedule linear" in out
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())["config"]
    assert saved["optim"]["lr"] == 0.005 and saved["optim"]["steps"] == 2
    # resume to 3 steps; changing the architecture on resume is refused
    assert cli_train(tmp_path, "--resume", "--steps", "3") == 0
    assert "resumed from" in capsys.readouterr().out
    assert cli_train(tmp_path, "--resume", "--steps", "4", "--base-channels", "32") == 2
    assert "cannot change ['base_channels']" in capsys.readouterr().err
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(tmp_path / "cli"), "--n", "4", "--steps", "3",
                 "--class", "7", "--out", str(png), "--save-npz", str(npz), "--seed", "5",
                 "--no-progress", "--sampler", "ddpm", "--device", "cpu"]) == 0
    arrays = np.load(npz)
    assert arrays["images"].shape == (4, 8, 8, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [7] * 4 and arrays["seeds"].tolist() == [5, 6, 7, 8]
    assert Image.open(png).size[0] > 8 * 4


def test_cli_errors_name_the_cause(tmp_path, capsys):
    assert cli_train(tmp_path, "--dataset", str(tmp_path / "nope")) == 2
    assert "nope" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_train(tmp_path, "--dataset", str(empty)) == 2
    assert "empty" in capsys.readouterr().err
    bad = tmp_path / "bad" / "cats"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"not a png at all")
    Image.new("RGB", (10, 12), "red").save(bad / "ok.png")
    assert cli_train(tmp_path, "--dataset", str(tmp_path / "bad")) == 2
    assert "broken.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-option"])
    assert e.value.code == 2 and "--no-such-option" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "x.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_toy_2d_training_uses_the_mlp_and_samples_a_scatter(tmp_path, capsys):
    assert main(["train", "--dataset", "toy:moons", "--toy-points", "512", "--steps", "3",
                 "--batch-size", "64", "--base-channels", "32", "--sample-steps", "3",
                 "--out-dir", str(tmp_path / "toy"), "--no-progress", "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert meta["network"]["name"] == "mlp" and meta["data_range"] is None
    out = tmp_path / "moons.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "toy"), "--n", "50", "--steps", "4",
                 "--out", str(out), "--save-npz", str(tmp_path / "m.npz"),
                 "--no-progress"]) == 0
    assert np.load(tmp_path / "m.npz")["images"].shape == (50, 2)
    assert Image.open(out).size == (384, 384)
