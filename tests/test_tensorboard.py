"""``--log tensorboard``: every numeric field of each metrics.jsonl line is a TensorBoard
scalar at its step; without the package the option is a one-line error (exit 2) before any
training."""

import json
import sys

import pytest

from difflab.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--steps", "4", "--log-every", "2", "--batch-size", "8", "--base-channels", "8",
        "--device", "cpu", "--no-progress"]
TRAIN = ["--channel-mult", "1", "--num-res-blocks", "1", "--attention-resolutions",
         "--sample-every", "0"]


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("command, extra", [("train", TRAIN), ("train-classifier", [])])
def test_tensorboard_scalars_match_the_metric_lines(tmp_path, command, extra):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main([command, "--out-dir", str(run), "--log", "tensorboard", *TINY, *extra]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(run / "tensorboard")
    assert set(logged) == {"loss", "lr", "images_per_s"}  # step and time are the axes
    for tag, points in logged.items():
        assert [s for s, _ in points] == [r["step"] for r in rows] == [2, 4]
        assert [v for _, v in points] == pytest.approx([r[tag] for r in rows], rel=1e-6)


@pytest.mark.parametrize("command, extra", [("train", TRAIN), ("train-classifier", [])])
def test_log_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys,
                                                         command, extra):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run = tmp_path / "run"
    assert main([command, "--out-dir", str(run), "--log", "tensorboard", *TINY, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # before the config line and any training
    assert captured.err.strip() == (f"difflab {command}: error: --log tensorboard needs the "
                                    "tensorboard package: pip install -e '.[tensorboard]'")
    assert not (run / "metrics.jsonl").exists()


def test_train_classifier_prints_one_config_line_and_no_tensorboard_files(tmp_path, capsys):
    """The default --log jsonl writes no TensorBoard folder; the config is one line of the
    changed options, as difflab train prints it, not a JSON dump."""
    run = tmp_path / "run"
    assert main(["train-classifier", "--out-dir", str(run), *TINY]) == 0
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists()
    out = capsys.readouterr().out
    assert "{" not in out.split("accuracy")[0]
    (line,) = [x for x in out.splitlines() if x.startswith("config:")]
    assert line == (f"config: --base-channels 8 --steps 4 --batch-size 8 --out-dir {run} "
                    f"--log-every 2 --device cpu (full config: {run / 'config.json'})")
    assert json.loads((run / "config.json").read_text())["config"]["base_channels"] == 8
