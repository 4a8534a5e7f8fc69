"""The throughput benchmark runs end to end (tiny network, one step per process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.mark.slow
def test_train_throughput_prints_a_table_with_a_ratio_column():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "tiny", "--sizes", "8", "--batch", "2",
         "--warmup", "1", "--steps", "1", "--repeats", "2", "--threads", "1",
         "--clock", "cpu", "--ablate-fused", "--ablate-native"],
        capture_output=True, text=True, check=True, timeout=300)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| difflab")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| difflab", "| difflab (fused, no native kernels)", "| difflab (plain ops)"]
    assert "native CPU kernels on" in out.stdout.splitlines()[0]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[1] == "8" and cells[2] == "2" and float(cells[5]) > 0  # px, batch, img/s
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert "diffusers unavailable" in out.stdout
    else:
        diffusers_row = next(line for line in out.stdout.splitlines()
                             if line.startswith("| diffusers"))
        assert "1.00x" in diffusers_row
        # the same architecture: parameter counts agree
        assert diffusers_row.split(" | ")[3] == rows[0].split(" | ")[3]


def test_sampler_benchmark_plots_rms_against_nfe(tmp_path):
    """benchmarks/samplers.py --plot: its RMS table rows (error, NFE used, ...) as a log-log
    PNG; here on two real rows of a 2-sampler run on the benchmark's exact mixture."""
    import importlib.util

    import torch

    path = SCRIPT.with_name("samplers.py")
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    process, data = bench.make_problem()
    x_T = torch.randn(8, bench.DIM, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64) * process.sigma(process.t_max)
    ref = data.ode_solution(x_T, process.t_max, process.t_min, rtol=1e-6, atol=1e-6)
    rows = []
    for label, fn, opts, spacing, k in bench.DIFFLAB[:2]:
        rows.append((label, {m: bench.cell(bench.rms(o, ref), n) for m in (5, 10)
                             for o, n in [bench.run_difflab(fn, opts, spacing, k, data, x_T,
                                                            m)]}))
    errors = [v[0] for _, vals in rows for v in vals.values()]
    assert all(e > 0 for e in errors)
    png = bench.plot_rms(rows, tmp_path / "samplers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
