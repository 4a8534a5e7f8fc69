"""Progress for commands whose work is many network evaluations of unknown count (edits,
grid fitting): a tqdm bar advanced by each call of the denoiser."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


class CountingDenoiser:
    """``denoiser`` that advances ``bar`` by one at each call (one batched network
    evaluation); every other attribute (``process``, ...) is the wrapped denoiser's."""

    def __init__(self, denoiser: Any, bar: tqdm):
        self.inner, self.bar = denoiser, bar

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        self.bar.update(1)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def nfe_progress(denoiser: Any, desc: str, enabled: bool = True,
                 total: int | None = None) -> Iterator[Any]:
    """The denoiser counted on a bar ``desc`` (unit NFE, on stderr; off when not
    ``enabled``), closed on leaving the block."""
    bar = tqdm(total=total, desc=desc, unit="NFE", disable=not enabled)
    try:
        yield CountingDenoiser(denoiser, bar)
    finally:
        bar.close()
