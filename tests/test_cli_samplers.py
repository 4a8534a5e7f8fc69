"""`difflab sample` reaches every registered sampler and forwards its options."""

import numpy as np
import pytest

from difflab.cli.main import main
from difflab.samplers import SAMPLERS


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    assert main(["train", "--dataset", "toy:moons", "--toy-points", "256", "--steps", "2",
                 "--batch-size", "32", "--base-channels", "16", "--sample-steps", "2",
                 "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("sampler,extra", [("unipc_bh2", ["--order", "3"]),
                                           ("heun", ["--churn", "2", "--spacing", "karras"]),
                                           ("dpm_solver", ["--order", "2", "--spacing", "logsnr"])])
def test_cli_samples_with_new_samplers(toy_run, tmp_path, sampler, extra):
    assert sampler in SAMPLERS
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(toy_run), "--n", "8", "--steps", "4",
                 "--sampler", sampler, *extra, "--out", str(tmp_path / "s.png"),
                 "--save-npz", str(npz), "--no-progress"]) == 0
    images = np.load(npz)["images"]
    assert images.shape == (8, 2) and np.isfinite(images).all()


def test_cli_rejects_unknown_sampler(toy_run, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(toy_run), "--sampler", "nope"])
