"""Mixed precision for the training step: autocast contexts and loss scaling.

``fp32`` runs everything in float32. ``bf16`` autocasts the network to bfloat16 (CUDA, and CPUs
with bf16 instructions); its exponent range equals float32's, so no loss scaling is needed.
``fp16`` autocasts to float16 on CUDA with a dynamic ``GradScaler`` (Micikevicius et al. 2018,
"Mixed Precision Training"), since float16 gradients underflow without it. Weights, optimizer
state, EMA and checkpoints stay float32 in every mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ``ValueError`` for an unknown mode or fp16 off CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device (it relies on loss scaling); "
                         "use 'bf16' or 'fp32' on the CPU")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Context in which the forward pass (and loss) runs at ``precision``."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A ``GradScaler`` that is active only for fp16 (a no-op pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
