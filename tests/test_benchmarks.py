"""The throughput benchmark runs end to end (tiny network, one step per process)."""

from __future__ import annotations

import json
import os
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


DISTILL = Path(__file__).resolve().parents[1] / "benchmarks" / "distillation.py"


@pytest.mark.slow
def test_distillation_benchmark_smoke_run(tmp_path):
    """--quick end to end: teacher rows at 1/2/4/8 NFE plus 50, one method's student rows
    (progressive: a student per round), the grid, the JSON, and the README section written in
    place twice -- the second time from the rows the first run kept (--methods none)."""
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n| script | what it measures | section |\n|---|---|---|\n"
                      "| `a.py` | a | [A](#a) |\n\n## A\n\nkept\n")
    cmd = [sys.executable, str(DISTILL), "--quick", "--teacher", str(tmp_path / "teacher"),
           "--out", str(tmp_path / "students"), "--grid", str(tmp_path / "grid.png"),
           "--json", str(tmp_path / "r.json"), "--readme", str(readme), "--threads", "1"]
    env = {**os.environ, "DIFFLAB_CACHE_DIR": str(tmp_path / "cache")}
    for methods in ("progressive", "none"):  # the second reuses the teacher and the rows
        subprocess.run([*cmd, "--methods", methods], capture_output=True, text=True,
                       check=True, timeout=900, env=env)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["teacher"]["reused"] and result["teacher"]["cpu_s"] > 0
    teacher = [r for r in result["rows"] if r["method"] == "teacher"]
    assert [r["target_nfe"] for r in teacher] == [1, 2, 4, 8, None]
    for r in teacher[:4]:
        assert r["nfe"] <= r["target_nfe"]
        # the best sampler is kept (FIDs equal to 4 decimals are ties)
        assert round(r["fid"], 4) == round(min(t["fid"] for t in r["tried"]), 4)
        assert 0 <= r["accuracy"] <= 1 and r["n"] == 100
    assert teacher[4]["nfe"] == 50 and teacher[4]["sampler"] == "ddim"
    assert result["methods"] == ["progressive"]
    for method in result["methods"]:
        rows = [r for r in result["rows"] if r["method"] == method]
        assert [r["target_nfe"] for r in rows] == [1, 2, 4, 8]
        assert all(r["distill_cpu_s"] > 0 for r in rows)
    text = readme.read_text()
    assert text.count("## Distillation (`benchmarks/distillation.py`)") == 1
    assert text.count("distillation.py --readme`") == 1  # one index row
    assert text.index("| `a.py`") < text.index("distillation.py --readme`") < text.index("## A")
    assert "kept" in text and "Goals of issue 17" in text
    assert (tmp_path / "grid.png").stat().st_size > 0


def _readme_section():
    sys.path.insert(0, str(DISTILL.parent))
    import readme_section
    return readme_section


README = ("# B\n\n| script | what it measures | section |\n|---|---|---|\n| `a.py` | a | [A](#a) |"
          "\n\n## A\n\nold a\n\n## B (`b.py`)\n\nold b\n\n## C\n\nc\n")


def test_readme_section_replaces_in_place_and_appends_once():
    rs = _readme_section()
    new = rs.replace_section(README, "B (`b.py`)", "new b")
    assert new == README.replace("old b", "new b")
    assert rs.replace_section(new, "B (`b.py`)", "new b") == new  # idempotent
    last = rs.replace_section(README, "C", "c2\n")
    assert last.endswith("## C\n\nc2\n") and "old b" in last
    added = rs.replace_section(README, "D", "d")
    assert added == README + "\n## D\n\nd\n"


def test_readme_index_row_added_once_at_the_end_of_the_table():
    rs = _readme_section()
    row = "| `d.py` | d | [D](#d) |"
    new = rs.add_index_row(README, row, "d.py")
    assert new == README.replace("[A](#a) |\n", "[A](#a) |\n" + row + "\n")
    assert rs.add_index_row(new, row, "d.py") == new
    with pytest.raises(ValueError, match="index table"):
        rs.add_index_row("# no table\n", row, "d.py")


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
