"""Shared test fixtures."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets its share of
# the cores, so torch's intra-op threads do not oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tests on tiny tensors, where thread start-up
    dominates on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_tiny_digits(tmp, steps: int, **options):
    """A tiny class-conditional U-Net trained ``steps`` steps on every 20th digit into
    ``tmp/run``; returns the digits (for input images). ``options`` are further config keys."""
    from difflab.data import load_digits
    from difflab.recipes import DiffusionRecipe, TrainConfig

    d = load_digits()
    idx = torch.arange(0, len(d), 20)
    data = type(d)(images=d.images[idx], labels=d.labels[idx], class_names=d.class_names)
    cfg = TrainConfig.from_values(dict(
        out_dir=str(tmp / "run"), steps=steps, batch_size=8, base_channels=16,
        channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], sample_every=0,
        checkpoint_every=0, device="cpu", **options))
    DiffusionRecipe(cfg, data=data).run(progress=False)
    return d


def train_toy_moons(run) -> None:
    """A 2-step toy-moons run in ``run`` (a model to read back, not a good one)."""
    from difflab.cli.main import main

    assert main(["train", "--dataset", "toy:moons", "--toy-points", "256", "--steps", "2",
                 "--batch-size", "32", "--base-channels", "16", "--sample-steps", "2",
                 "--out-dir", str(run), "--no-progress", "--device", "cpu"]) == 0


def image_folder(root, size, odd=(50, 20)):
    """Two classes of 3 random RGB images of ``size`` px, plus one ``odd``-sized image."""
    rng = np.random.default_rng(size)
    for name in ["cats", "dogs"]:
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    Image.new("RGB", odd, (9, 9, 9)).save(root / "cats" / "odd.png")
    return root
