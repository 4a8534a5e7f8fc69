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
