"""Multi-process training and sampling under torchrun (2 CPU processes, gloo) match one
process: same losses and weights for the same global batch, resume across a change of
world size, and the same images for the same seeds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab.cli.main import main

TRAIN = ["train", "--dataset", "digits", "--resolution", "8", "--base-channels", "16",
         "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attention-resolutions", "4",
         "--num-heads", "2", "--batch-size", "8", "--dropout", "0", "--log-every", "1",
         "--sample-every", "0", "--checkpoint-every", "2", "--keep-checkpoints", "0",
         "--sample-steps", "2", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu",
         "--no-progress"]


def torchrun(*args: str) -> None:
    """``torchrun --standalone --nproc_per_node 2 -m difflab ARGS`` (fails the test on error)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "difflab", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}.safetensors")


def assert_same_run(a, b, step: int) -> None:
    np.testing.assert_allclose(losses(a)[-2:], losses(b)[-2:], rtol=1e-5)
    wa, wb = weights(a, step), weights(b, step)
    for k in wa:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    assert main(TRAIN + ["--steps", "4", "--out-dir", str(run)]) == 0
    return run


@pytest.mark.slow
def test_ddp_matches_single_process_and_resumes_across_world_size(single, tmp_path):
    ddp = tmp_path / "ddp"
    torchrun(*TRAIN, "--steps", "4", "--out-dir", str(ddp))
    assert len(losses(ddp)) == 4  # rank 0 alone logs
    assert_same_run(single, ddp, 4)
    # two processes wrote step 2; one process resumes from it
    mixed = tmp_path / "mixed"
    ckpt = ddp / "checkpoints" / "step_00000002.json"
    assert main(TRAIN + ["--steps", "4", "--out-dir", str(mixed), "--resume", str(ckpt)]) == 0
    assert_same_run(single, mixed, 4)


@pytest.mark.slow
def test_sharded_sampling_writes_the_same_images(single, tmp_path):
    common = ["sample", "--checkpoint", str(single), "--seeds", "3-9", "--steps", "3",
              "--batch-size", "1", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(common + ["--out", f"{one}.png", "--save-npz", f"{one}.npz"]) == 0
    torchrun(*common, "--out", f"{two}.png", "--save-npz", f"{two}.npz")
    a, b = np.load(f"{one}.npz"), np.load(f"{two}.npz")
    assert a["images"].shape[0] == 7 and list(a["seeds"]) == list(range(3, 10))
    for key in ("images", "labels", "seeds"):
        np.testing.assert_array_equal(a[key], b[key])
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


def test_process_group_releases_on_success_and_on_error():
    """The DDP wrapper is dropped before the group is left, whether the block ends or fails
    (a wrapper kept alive past exit tears gloo down during interpreter shutdown)."""
    from difflab.training.distributed import process_group

    calls = []
    with process_group(lambda: calls.append("ok")):
        pass
    with pytest.raises(RuntimeError, match="boom"), process_group(lambda: calls.append("err")):
        raise RuntimeError("boom")
    assert calls == ["ok", "err"]
