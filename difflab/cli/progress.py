"""Progress for commands whose work is many network evaluations of unknown count (edits,
grid fitting): a tqdm bar advanced by each call of the denoiser."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


class ProgressDenoiser:
    """``denoiser`` that advances a tqdm bar by one at each call (one batched network
    evaluation); every other attribute (``process``, ...) is the wrapped denoiser's.

    The bar opens at the first call, so an error raised before any network evaluation (a bad
    option or input file) is printed alone, as one line."""

    def __init__(self, denoiser: Any, **bar_options: Any):
        self.inner, self.bar_options, self.bar = denoiser, bar_options, None
        self.calls = 0  # network evaluations so far (also with the bar disabled)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        self.calls += 1
        if self.bar is None:
            self.bar = tqdm(**self.bar_options)
        self.bar.update(1)
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def nfe_progress(denoiser: Any, desc: str, enabled: bool = True,
                 total: int | None = None) -> Iterator[Any]:
    """The denoiser counted on a bar ``desc`` (unit NFE, on stderr; off when not
    ``enabled``), closed on leaving the block."""
    counted = ProgressDenoiser(denoiser, total=total, desc=desc, unit="NFE",
                               disable=not enabled)
    try:
        yield counted
    finally:
        counted.close()
