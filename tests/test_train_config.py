"""The run configs: every config class round-trips through JSON; flat (old) keys, dotted keys
and nested tables all load the same; bad files are refused naming key, value and type; an
old checkpoint's flat config resumes; only fields marked ``resume`` may change."""

import dataclasses
import json

import pytest

from difflab.cli.main import main
from difflab.config import ConfigError, from_dict, leaves, to_dict
from difflab.networks import MLPConfig, UNetConfig
from difflab.objectives import ObjectiveConfig
from difflab.recipes import ClassifierTrainConfig, TrainConfig
from difflab.recipes.config import (
    DataConfig,
    DiffusionConfig,
    NetworkConfig,
    OptimConfig,
    RunConfig,
    SpeedConfig,
)
from difflab.training import LoopConfig

#: one non-default value per config class
CHANGED = {
    DataConfig: {"dataset": "toy:moons", "channels": 3},
    NetworkConfig: {"model_size": "small", "unet": {"channel_mult": [1, 2, 4]}},
    UNetConfig: {"channel_mult": [1, 1], "attention_resolutions": [], "num_classes": 3},
    MLPConfig: {"hidden": 7, "num_classes": 2},
    DiffusionConfig: {"prediction": "v", "T": 10},
    ObjectiveConfig: {"name": "hybrid", "loss_space": "x0"},
    OptimConfig: {"lr": 0.5, "steps": 3},
    RunConfig: {"out_dir": "x", "seed": 4},
    SpeedConfig: {"precision": "bf16", "compile": True},
    TrainConfig: {"optim": {"lr": 0.25}, "network": {"mlp": {"depth": 2}}},
    ClassifierTrainConfig: {"channel_mult": [1], "channels": 1},
    LoopConfig: {"ema_decay": None, "precision": "fp16"},
}


@pytest.mark.parametrize("cls", list(CHANGED), ids=lambda c: c.__name__)
def test_every_config_round_trips_through_json(cls):
    for config in (cls(), from_dict(cls, CHANGED[cls])):
        text = json.dumps(to_dict(config))
        assert from_dict(cls, json.loads(text)) == config
    assert from_dict(cls, CHANGED[cls]) != cls()


def test_every_train_field_has_help_and_the_resume_marks_are_the_known_set():
    for leaf in leaves(TrainConfig):
        assert leaf.help, leaf.path
    free = {leaf.name for leaf in leaves(TrainConfig) if leaf.resume}
    assert free == {"steps", "log_every", "sample_every", "checkpoint_every",
                    "keep_checkpoints", "device", "out_dir", "precision", "compile",
                    "compile_mode", "channels_last", "grad_checkpointing", "reuse_cpu_memory",
                    "log"}  # --log jsonl|tensorboard may change on resume


def test_flat_dotted_and_nested_keys_give_the_same_config():
    flat = {"lr": 0.01, "base_channels": 16, "objective": "vlb", "resolution": 16,
            "attention_resolutions": [8],
            "channel_mult": None}  # None: from the preset, as in old configs
    dotted = {"optim.lr": 0.01, "network.unet.base_channels": 16, "objective.name": "vlb",
              "data.resolution": 16, "network.unet.attention_resolutions": [8]}
    nested = {"optim": {"lr": 0.01},
              "network": {"unet": {"base_channels": 16, "attention_resolutions": [8]}},
              "objective": {"name": "vlb"}, "data": {"resolution": 16}}
    a, b, c = (TrainConfig.from_values(v) for v in (flat, dotted, nested))
    assert a == b == c
    assert a.network.unet.base_channels == 16 and a.network.unet.channel_mult == (1, 2)
    assert a.network.unet.image_size == 16  # the data resolution
    small = TrainConfig.from_values({"model_size": "small", "num_res_blocks": 3})
    assert (small.network.unet.base_channels, small.network.unet.num_res_blocks) == (64, 3)
    toy = TrainConfig.from_values({"dataset": "toy:moons", "base_channels": 32})
    assert toy.network.mlp.hidden == 32  # --base-channels: the MLP width for 2-D data


@pytest.mark.parametrize("values, words", [
    ({"lr": "fast"}, ["optim.lr", "'fast'", "float"]),
    ({"optim": {"steps": 2.5}}, ["optim.steps", "2.5", "int"]),
    ({"precision": "fp8"}, ["speed.precision", "'fp8'", "'bf16'"]),
    ({"channel_mult": [1, "2"]}, ["network.unet.channel_mult[1]", "'2'", "int"]),
    ({"stepz": 3}, ["unknown key", "'stepz'"]),
    ({"optim": {"lrr": 1}}, ["unknown key", "'optim.lrr'"]),
])
def test_bad_values_are_refused_naming_key_value_and_type(values, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_values(values, where="cfg.json")
    assert all(w in str(e.value) for w in ["cfg.json", *words]), str(e.value)


ARGS = ["--no-progress", "--base-channels", "16", "--channel-mult", "1", "2",
        "--num-res-blocks", "1", "--attention-resolutions", "--batch-size", "8",
        "--sample-every", "0", "--log-every", "1", "--device", "cpu"]


def test_cli_config_files_flat_or_nested_and_bad_ones(tmp_path, capsys):
    for name, content in [("flat", {"steps": 1, "schedule": "linear", "objective": "simple"}),
                          ("nested", {"optim": {"steps": 1},
                                      "diffusion": {"schedule": "linear"}})]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        assert main(["train", "--config", str(path), "--out-dir", str(tmp_path / name),
                     *ARGS]) == 0
        saved = json.loads((tmp_path / name / "config.json").read_text())["config"]
        assert saved["diffusion"]["schedule"] == "linear" and saved["optim"]["steps"] == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = "fast"\n')
    assert main(["train", "--config", str(bad), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "optim.lr = 'fast': expected float" in err


def test_resume_from_a_checkpoint_with_the_old_flat_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out-dir", str(run), *ARGS]) == 0
    # rewrite the checkpoint's config in the flat form main wrote before the nesting
    ckpt = run / "checkpoints" / "step_00000002.json"
    meta = json.loads(ckpt.read_text())
    c = TrainConfig.from_dict(meta["config"])
    flat = {leaf.name: v for leaf in leaves(TrainConfig)
            if leaf.field.metadata.get("cli", True) and leaf.name not in ("hidden", "depth",
                                                                          "time_dim", "groups",
                                                                          "p_mean", "p_std")
            for v in [_get(to_dict(c), leaf.path)]}
    flat["objective"] = flat.pop("name", "simple")
    meta["config"] = flat
    ckpt.write_text(json.dumps(meta))
    assert main(["train", "--resume", "--steps", "3", "--out-dir", str(run), *ARGS]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["train", "--resume", "--steps", "4", "--out-dir", str(run), *ARGS,
                 "--lr", "0.5"]) == 2
    assert "cannot change ['lr']" in capsys.readouterr().err


def _get(d, path):
    for p in path.split("."):
        d = d[p]
    return d


def test_loop_config_is_the_run_configs_share():
    from difflab.recipes.diffusion import loop_config
    c = TrainConfig.from_values({"lr": 0.3, "steps": 7, "precision": "bf16", "seed": 5})
    lc = loop_config(c)
    assert (lc.lr, lc.steps, lc.precision, lc.seed) == (0.3, 7, "bf16", 5)
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    assert names >= {"steps", "lr", "warmup_steps", "weight_decay", "grad_clip", "ema_decay",
                     "precision", "compile", "checkpoint_every", "keep_checkpoints", "out_dir",
                     "seed"}


def test_network_choice_is_checked_against_the_data(tmp_path, capsys):
    base = ["train", "--steps", "1", "--no-progress", "--sample-every", "0"]
    assert main([*base, "--network", "mlp", "--out-dir", str(tmp_path / "a")]) == 2
    assert "--network mlp does not take images" in capsys.readouterr().err
    assert main([*base, "--network", "unet", "--dataset", "toy:moons", "--toy-points", "64",
                 "--batch-size", "8", "--out-dir", str(tmp_path / "b")]) == 2
    assert "--network unet does not take 2-D points" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--network", "classifier"])  # registered, but not a denoiser group
    assert "invalid choice: 'classifier'" in capsys.readouterr().err


def test_scenes_default_to_their_own_64_px():
    notes: list[str] = []
    config = TrainConfig.from_values({"data.dataset": "scenes:captions"}, notes=notes)
    assert config.data.resolution == 64 == config.network.unet.image_size
    assert any("resolution 64" in n for n in notes)
    assert TrainConfig.from_values({"data.dataset": "scenes",
                                    "data.resolution": 32}).data.resolution == 32
