"""Objectives in the training loop and the CLI: options saved and respected on loading,
importance-sampling state in checkpoints (bitwise resume)."""

import json

import pytest
import torch

from difflab.cli.main import main
from difflab.data import load_digits
from difflab.pipeline import Pipeline
from difflab.recipes import DiffusionRecipe, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(resolution=8, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[], num_heads=2, batch_size=8, log_every=2,
            sample_every=0, checkpoint_every=0, sample_steps=2, warmup_steps=2, lr=1e-3,
            dropout=0.0, device="cpu")


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    idx = torch.arange(0, len(d), 18)
    return type(d)(images=d.images[idx], labels=d.labels[idx], class_names=d.class_names)


def cli_train(out, *extra):
    return main(["train", "--out-dir", str(out), "--no-progress", "--base-channels", "16",
                 "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attention-resolutions",
                 "--batch-size", "8", "--sample-steps", "2", "--log-every", "1", "--steps", "2",
                 "--device", "cpu", *extra])


def test_cli_objective_options_round_trip(tmp_path, capsys):
    out = tmp_path / "hybrid"
    assert cli_train(out, "--objective", "hybrid", "--weighting", "min_snr",
                     "--min-snr-gamma", "3") == 0
    meta = json.loads((out / "config.json").read_text())
    c = meta["config"]
    o = c["objective"]
    assert (o["name"], o["weighting"], o["min_snr_gamma"]) == ("hybrid", "min_snr", 3.0)
    assert meta["learned_variance"] and meta["network"]["config"]["out_channels"] == 2
    den = Pipeline.from_pretrained(out).denoiser(clip=False)
    assert den.learned_variance
    pred = den(torch.randn(2, 1, 8, 8), 500.0, torch.tensor([1, 2]))
    assert pred.var_frac is not None and pred.x0.shape == (2, 1, 8, 8)
    assert float(pred.var_frac.min()) >= 0 and float(pred.var_frac.max()) <= 1
    assert main(["sample", "--checkpoint", str(out), "--n", "2", "--steps", "3", "--sampler",
                 "ddpm", "--out", str(tmp_path / "s.png"), "--no-progress",
                 "--device", "cpu"]) == 0
    edm = tmp_path / "edm"
    assert cli_train(edm, "--objective", "edm", "--prediction", "edm") == 0
    pipe = Pipeline.from_pretrained(edm)
    assert pipe.stage.prediction == "edm" and pipe.card.training["objective"]["name"] == "edm"
    capsys.readouterr()
    assert cli_train(tmp_path / "bad", "--objective", "edm") == 2
    assert "needs --prediction edm" in capsys.readouterr().err
    assert cli_train(tmp_path / "bad2", "--objective", "vlb", "--schedule", "vpsde") == 2
    assert "needs a discrete schedule" in capsys.readouterr().err
    assert cli_train(tmp_path / "bad3", "--objective", "hybrid", "--dataset", "toy:moons") == 2
    assert "needs image data" in capsys.readouterr().err


def test_vlb_objective_resumes_bitwise_with_its_importance_history(tmp_path, digits):
    def make(name):  # T = 4: the history of 10 losses per step fills within 5 steps
        config = TrainConfig.from_values(dict(out_dir=str(tmp_path / name), steps=8,
                                              objective="vlb", T=4, **TINY))
        return DiffusionRecipe(config, data=digits)
    full = make("full")
    full.run(progress=False)
    assert not bool((full.time_sampler.counts < 10).any())  # importance sampling was on
    part = make("part")
    part.run(steps=4, progress=False)
    resumed = make("part")
    resumed.resume(part.latest_checkpoint())
    resumed.run(progress=False)
    for name, a in full.net.state_dict().items():
        assert torch.equal(a, resumed.net.state_dict()[name]), name
    assert torch.equal(full.time_sampler.losses, resumed.time_sampler.losses)
