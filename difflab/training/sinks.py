"""Metrics sinks of the training loop: where a metric line goes besides ``metrics.jsonl``.

``metrics.jsonl`` is always written (one JSON object per line: step, loss, lr, images/s,
time). ``log="tensorboard"`` also writes every numeric field of each line as a TensorBoard
scalar (``torch.utils.tensorboard``) under ``RUN/tensorboard``, for ``tensorboard --logdir
RUN``. TensorBoard is an optional extra: ``pip install -e '.[tensorboard]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

__all__ = ["LOG_KINDS", "MetricsSink", "TensorBoardSink", "TensorBoardUnavailable",
           "check_log", "make_sinks"]

#: the values of ``--log``
LOG_KINDS = ("jsonl", "tensorboard")
#: what to install for ``--log tensorboard``
TENSORBOARD_EXTRA = "pip install -e '.[tensorboard]'"


class TensorBoardUnavailable(ValueError):
    """``--log tensorboard`` without the tensorboard package (a one-line CLI error)."""


class MetricsSink(Protocol):
    """Receives each metric line of a run (rank 0 only)."""

    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TensorBoardUnavailable(
            f"--log tensorboard needs the tensorboard package: {TENSORBOARD_EXTRA}") from e
    return SummaryWriter


def check_log(kind: str) -> None:
    """Raise now (before any training) if ``kind`` cannot be logged to here.

    Raises:
        ValueError: an unknown kind.
        TensorBoardUnavailable: ``"tensorboard"`` without the package installed."""
    if kind not in LOG_KINDS:
        raise ValueError(f"--log must be one of {', '.join(LOG_KINDS)}, got {kind!r}")
    if kind == "tensorboard":
        _summary_writer()


class TensorBoardSink:
    """Each numeric field of a metric line (except ``step`` and ``time``) as a scalar of that
    name at its step, stamped with the line's wall time; flushed per line so a crash keeps
    what was logged."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = _summary_writer()(log_dir=str(self.log_dir))

    def write(self, row: dict[str, Any]) -> None:
        step, wall = int(row["step"]), row.get("time")
        for key, value in row.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step, walltime=wall)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_sinks(kind: str, out_dir: str | Path) -> list[MetricsSink]:
    """The sinks besides ``metrics.jsonl`` for ``--log kind`` in run folder ``out_dir``."""
    check_log(kind)
    return [TensorBoardSink(Path(out_dir) / "tensorboard")] if kind == "tensorboard" else []
