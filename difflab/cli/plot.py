"""``difflab plot RUN``: a run's training log (and any eval results) as PNG figures.

Reads ``RUN/metrics.jsonl`` (one JSON object per logging interval: step, loss, lr,
images_per_s, ...) and writes ``RUN/plots/loss.png``: one panel per logged quantity against the
step, the loss on a log axis when it stays positive. Eval results (the JSON that ``difflab
eval --out`` / ``difflab nll --out`` write) found as ``RUN/eval/*.json`` or ``RUN/eval*.json``
go to ``RUN/plots/eval.png``, one panel per numeric result, one bar per file.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..data import DataError
from ..io import atomic_write, read_jsonl
from .outputs import add_overwrite_option, check_outputs

#: columns of metrics.jsonl that are not plotted against the step
SKIP = ("step", "time")
#: panel titles of the quantities the training loop logs
TITLES = {"loss": "training loss", "lr": "learning rate", "images_per_s": "images / s"}


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot a run's loss, learning rate, images/s and evals",
                       description="Write RUN/plots/loss.png (every quantity of "
                                   "RUN/metrics.jsonl against the step) and, when eval "
                                   "results are in RUN/eval/*.json or RUN/eval*.json, "
                                   "RUN/plots/eval.png.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run folder (holds metrics.jsonl)")
    p.add_argument("--out-dir", default=None, help="folder of the PNGs (default: RUN/plots)")
    add_overwrite_option(p)
    p.set_defaults(func=run_plot)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a one-line DataError for a missing or empty file or a
    line that is not a JSON object with a numeric ``step``."""
    if not path.is_file():
        raise DataError(f"no training log {path}: RUN must be a run folder of difflab "
                        "train or train-classifier")
    rows = []
    for k, row in read_jsonl(path, DataError):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int | float):
            raise DataError(f"{path}, line {k}: expected an object with a numeric 'step'")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} is empty: the run has not logged a step yet")
    return rows


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def series(rows: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Quantity -> (steps, values), in the order first logged, without step and time."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for k, v in _numeric(row).items():
            if k not in SKIP:
                out.setdefault(k, ([], []))
                out[k][0].append(float(row["step"]))
                out[k][1].append(v)
    return out


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def plot_metrics(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per quantity against the step, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(rows)
    if not data:
        raise DataError(f"{title}: metrics.jsonl holds no numeric quantity to plot")
    fig, axes = plt.subplots(1, len(data), figsize=(4 * len(data), 3.2), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes[0], data.items(), strict=True):
        ax.plot(steps, values, marker="." if len(values) < 30 else None)
        ax.set_title(TITLES.get(name, name))
        ax.set_xlabel("step")
        if name == "loss" and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def eval_results(run: Path) -> dict[str, dict[str, float]]:
    """File stem -> numeric results of the eval JSON files of a run (others skipped)."""
    found = {}
    for f in sorted([*run.glob("eval/*.json"), *run.glob("eval*.json")]):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        values = _numeric(data) if isinstance(data, dict) else {}
        if values:
            found[f.stem] = values
    return found


def plot_evals(results: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """One panel per numeric result, one bar per eval file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(k for r in results.values() for k in r))
    fig, axes = plt.subplots(1, len(names), figsize=(3.5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        files = [f for f, r in results.items() if name in r]
        ax.bar(range(len(files)), [results[f][name] for f in files])
        ax.set_xticks(range(len(files)), files, rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_error_vs_nfe(curves: dict[str, tuple[list[float], list[float]]], path: Path,
                      title: str, ylabel: str = "RMS error", legend_size: float = 8) -> Path:
    """One line per curve, error against the number of network evaluations, log-log (a
    curve of one point is a marker); points with a non-positive error are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4) if len(curves) < 6 else (9, 6))
    for name, (nfe, err) in curves.items():
        pts = sorted((n, e) for n, e in zip(nfe, err, strict=True)
                     if n > 0 and math.isfinite(e) and e > 0)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if curves:
        ax.legend(fontsize=legend_size)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def run_plot(args: argparse.Namespace) -> int:
    run = Path(args.run)
    out_dir = Path(args.out_dir) if args.out_dir else run / "plots"
    rows = read_metrics(run / "metrics.jsonl")
    results = eval_results(run)
    for name in ("loss.png", "eval.png") if results else ("loss.png",):
        check_outputs(args, out_dir=out_dir / name)
    print(f"wrote {plot_metrics(rows, out_dir / 'loss.png', f'{run.name}: training')}")
    if results:
        print(f"wrote {plot_evals(results, out_dir / 'eval.png', f'{run.name}: eval')}")
    return 0
