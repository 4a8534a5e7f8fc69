"""benchmarks/sampler_family_grids.py: its per-draw columns and its refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import sampler_family_grids as grids  # noqa: E402


def test_draw_errors_are_the_three_largest_distances():
    ref = torch.zeros(6, 4, dtype=torch.float64)
    x = ref.clone()
    x[1, 0], x[3] = 3.0, torch.tensor([1.0, 1.0, 1.0, 1.0])  # distances 3 and 2
    x[5, 2] = -0.5
    assert grids.draw_errors(x, ref) == pytest.approx([3.0, 2.0, 0.5])


def test_row_gives_the_rms_and_its_ratio():
    ref = torch.zeros(4, 2, dtype=torch.float64)
    x = torch.full((4, 2), 0.1, dtype=torch.float64)
    e, line = grids.row("name", x, ref, theirs=0.2)
    assert e == pytest.approx(0.1)
    assert line.startswith("| name | 0.1 | 0.50 | 0.141 / 0.141 / 0.141 |")


@pytest.mark.parametrize("args, says", [
    (["--load", "no/such.json", "--cell", "0", "5"], "no such file"),
    (["--load", str(BENCH / "sampler_family_31000.json"), "--cell", "12", "5"], "--cell"),
    (["--load", str(BENCH / "sampler_family_31000.json"), "--cell", "0", "7"], "--cell"),
    (["--load", str(BENCH / "sampler_family_31000.json"), "--cell", "0", "5", "--top", "0"],
     "--top"),
    (["--load", str(BENCH / "README.md"), "--cell", "0", "5"], "not a sampler_family.py"),
])
def test_bad_options_are_refused_in_one_line(args, says):
    out = subprocess.run([sys.executable, str(BENCH / "sampler_family_grids.py"), *args],
                         capture_output=True, text=True)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr
