"""The one training loop knows nothing of networks: it trains a plain linear model on a toy
batch source through the same code path, resumes bitwise, and stays below data/networks.
The data registry and batch sources it is fed from."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from difflab.data import (
    DATASETS,
    Batch,
    DataError,
    DataRequest,
    EpochSource,
    PointData,
    RandomSource,
    load_data,
)
from difflab.training import LoopConfig, TrainLoop, init_device


def linear_data(n=64, seed=0):
    """y = x W* + noise: the least-squares target a linear model must approach."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    w = torch.tensor([[1.0], [-2.0], [0.5]])
    return x, x @ w + 0.01 * torch.randn(n, 1, generator=g)


class PairSource:
    """Batches of (x, y) rows: an epoch-wise shuffle over the index set (stateless)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y = x, y
        self.rows = EpochSource(torch.arange(len(x)), None, batch_size, seed=3)

    def batch(self, step, generator):
        idx = self.rows.batch(step).x
        return Batch(self.x[idx], self.y[idx])


def noisy_mse(module, batch, ctx):
    """MSE on inputs jittered by noise from the run's generator (drawn for the global batch)."""
    jitter = 0.01 * torch.randn(batch.x.shape, generator=ctx.generator, device=ctx.device)
    x = batch.x[ctx.local] + jitter[ctx.local]
    return (module(x) - batch.labels[ctx.local]).pow(2).sum(1)


def make_loop(tmp_path, name, steps=12, **kw):
    dist, device = init_device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Linear(8, 1))
    cfg = LoopConfig(**{"steps": steps, "lr": 0.05, "warmup_steps": 3, "log_every": 2,
                        "sample_every": 4, "checkpoint_every": 0,
                        "out_dir": str(tmp_path / name), "ema_decay": 0.9} | kw)
    calls = []
    loop = TrainLoop(cfg, model, PairSource(*linear_data(), 16), noisy_mse,
                     lambda: {"task": "linear"}, dist, device,
                     callbacks=[lambda lp: calls.append(lp.step)])
    return loop, calls


def test_loop_trains_a_linear_model_and_calls_back(tmp_path):
    loop, calls = make_loop(tmp_path, "a", steps=40)
    result = loop.run(progress=False)
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"]  # it learnt
    assert [r["step"] for r in rows] == list(range(2, 41, 2))
    assert rows[0]["lr"] == pytest.approx(0.05 * 2 / 3) and rows[-1]["lr"] == 0.05
    assert calls == list(range(4, 41, 4))
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["task"] == "linear" and meta["ema_updates"] == 0
    assert result["step"] == 40 and result["checkpoint"].endswith("step_00000040.json")


def test_loop_resume_is_bitwise(tmp_path):
    full, _ = make_loop(tmp_path, "full")
    full.run(progress=False)
    part, _ = make_loop(tmp_path, "part")
    part.run(steps=5, progress=False)  # stops mid-epoch and mid-warm-up
    resumed, _ = make_loop(tmp_path, "part")
    resumed.resume(part.latest_checkpoint())
    assert resumed.step == 5
    resumed.run(progress=False)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.model.parameters(), resumed.ema.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())


def test_loop_without_ema_saves_no_ema(tmp_path):
    loop, _ = make_loop(tmp_path, "noema", steps=2, ema_decay=None, fused_adamw=False)
    loop.run(progress=False)
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "noema" / "checkpoints" / "step_00000002.safetensors")
    assert not any(k.startswith("ema.") for k in keys) and "rng.generator" in keys


def test_training_imports_no_networks_data_text_or_samplers():
    code = ("import sys, difflab.training; "
            "print(sorted(m for m in sys.modules if m.split('.')[1:2] and m.split('.')[1] in "
            "('networks', 'data', 'text', 'samplers', 'recipes', 'objectives', 'process')"
            " and m.startswith('difflab.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# -- batch sources ------------------------------------------------------------------------------

def test_epoch_source_is_a_permutation_per_epoch_and_stateless():
    src = EpochSource(torch.arange(10), torch.arange(10) % 3, batch_size=4, seed=1)
    stream = torch.cat([src.batch(k).x for k in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # each epoch its own shuffle
    again = EpochSource(torch.arange(10), None, batch_size=4, seed=1)
    assert torch.equal(again.batch(3).x, src.batch(3).x)  # no state: step 3 directly
    assert torch.equal(src.batch(3).labels, src.batch(3).x % 3)


def test_random_source_draws_from_the_run_generator():
    src = RandomSource(torch.arange(100), None, batch_size=50)
    a = src.batch(0, torch.Generator().manual_seed(4)).x
    b = src.batch(7, torch.Generator().manual_seed(4)).x
    assert torch.equal(a, b) and len(set(a.tolist())) < 50  # with replacement


# -- the data registry -----------------------------------------------------------------------------

def test_registry_names_and_toy_points():
    assert {"digits", "shapes", "folder", "toy"} <= set(DATASETS)
    pts = load_data("toy:moons", DataRequest(points=300, points_seed=2))
    assert isinstance(pts, PointData) and pts.points.shape == (300, 2)
    assert torch.equal(pts.points, load_data("toy:moons", DataRequest(points=300,
                                                                      points_seed=2)).points)
    assert load_data("DIGITS").images.shape == (1797, 1, 8, 8)
    with pytest.raises(DataError, match="toy dataset 'blobs'"):
        load_data("toy:blobs")
    with pytest.raises(DataError, match="does not exist"):
        load_data("no_such_thing")


def test_registry_takes_a_new_dataset(monkeypatch):
    def ones(arg, r):
        return PointData(torch.full((int(arg or 4), 3), 1.0))
    monkeypatch.setitem(DATASETS, "ones", (ones, True))
    assert load_data("ones:5").points.shape == (5, 3)
