"""benchmarks/local_gaussian.py: its summary statistics, and its errors on a single isotropic
Gaussian problem of the family (where local_gaussian is exact and the others are not)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import local_gaussian as bench  # noqa: E402
import sampler_family  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_rows_are_median_geometric_mean_and_worst():
    def res(scale):
        return {s: {5: (scale if s != "dpmpp_2m" else 1.0)} for s in bench.SAMPLERS}

    text = bench.tables(["a", "b", "c"], [res(0.25), res(1.0), res(4.0)], [5])
    row = next(line for line in text.splitlines() if line.startswith("| ddim / dpmpp_2m |"))
    assert row == "| ddim / dpmpp_2m | 1.00, 1.00, 4.00 |"
    row = next(line for line in text.splitlines()
               if line.startswith("| local_unipc / unipc_bh2 |"))
    assert row == "| local_unipc / unipc_bh2 | 1.00, 1.00, 1.00 |"


def test_exact_on_a_single_isotropic_gaussian_problem():
    """Seed 21003 of the family is one isotropic Gaussian (vpsde, d = 28): local_gaussian and
    local_unipc are at the reference's tolerance, DPM-Solver++(2M) and UniPC far from it."""
    problem = sampler_family.draw_problem(21003)
    assert "K=1 isotropic" in problem.name
    out = bench.errors(problem, 16, [5], seed=0)
    assert out["local_gaussian"][5] < 1e-7 and out["local_unipc"][5] < 1e-7
    assert out["dpmpp_2m"][5] > 1e-3 and out["unipc_bh2"][5] > 1e-3
