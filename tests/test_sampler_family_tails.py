"""benchmarks/sampler_family_tails.py: its per-draw statistics, its choice of cells, and that
the rerun of a saved run's best configurations reproduces the run's errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sampler_family as bench  # noqa: E402
import sampler_family_tails as tails  # noqa: E402


def test_ratio_interval_is_the_rms_ratio_and_brackets_it():
    rng = np.random.default_rng(0)
    theirs = rng.exponential(size=400)
    r, lo, hi = tails.ratio_interval(4.0 * theirs, theirs)
    assert r == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    ours = rng.exponential(size=400)
    r, lo, hi = tails.ratio_interval(ours, theirs)
    assert r == pytest.approx(math.sqrt(ours.mean() / theirs.mean()))
    assert lo < r < hi


def test_tail_stats_separate_the_worst_draws():
    """One draw in 20 carries diffusers' error: its share is that draw's, the other 95% keep
    the bulk ratio, and the median per-draw ratio is the bulk's."""
    theirs = np.full(20, 1.0)
    theirs[7] = 1e4
    ours = np.full(20, 0.25)
    ours[7] = 1e4
    t = tails.tail_stats(ours, theirs)
    assert t["share_theirs"] == pytest.approx(1e4 / (1e4 + 19))
    assert t["rest"] == pytest.approx(0.5) and t["median"] == pytest.approx(0.5)


def test_worst_cells_are_those_above_the_threshold_worst_first():
    nfes = bench.NFES
    res = [{"difflab": {"a [default]": {m: 1.0 for m in nfes}},
            "diffusers": {"X": {m: v for m in nfes}}} for v in (2.0, 1.0, 1.25)]
    cells = tails.worst_cells(res, 0.7, 100)
    assert [(round(r, 2), i) for r, i, _ in cells][::len(nfes)] == [(1.0, 1), (0.8, 2)]
    assert len(cells) == 2 * len(nfes) and len(tails.worst_cells(res, 0.7, 3)) == 3


@pytest.mark.slow
def test_only_reruns_the_named_configurations_with_the_same_errors():
    pytest.importorskip("diffusers")
    p = bench.draw_problem(1001)
    full = bench.evaluate(p, 5000, 8, 1e-6, {})
    only = {"heun [ays]", "plms [default]", "DDIM"}
    outputs: dict = {}
    part = bench.evaluate(p, 5000, 8, 1e-6, {}, only=only, outputs=outputs)
    assert set(part["difflab"]) | set(part["diffusers"]) == only
    for lib in ("difflab", "diffusers"):
        for label, row in part[lib].items():
            assert row == full[lib][label]
            for m, e in row.items():
                rms = math.sqrt(tails.squared_errors(outputs, label, m).mean())
                assert rms == pytest.approx(e, rel=1e-12)
    other = bench.evaluate(p, 5000, 8, 1e-6, {}, only=only, noise_seed=77)
    assert other["diffusers"]["DDIM"] != part["diffusers"]["DDIM"]
