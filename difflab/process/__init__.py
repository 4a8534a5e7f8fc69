"""Forward processes and noise schedules (no torch.nn here)."""

from __future__ import annotations

from typing import Any

from .base import Process, as_time, expand_like
from .continuous import VPSDE, CosineRates, ZeroTerminalSNR
from .discrete import BETA_SCHEDULES, DiscreteProcess, rescale_zero_terminal_snr
from .flow import RectifiedFlow
from .forward import markov_chain, q_sample, q_step, transition
from .ve import VEProcess

CONTINUOUS = {"vpsde": VPSDE, "cosine_rates": CosineRates, "ve": VEProcess,
              "rectified_flow": RectifiedFlow}
PROCESS_NAMES = sorted(BETA_SCHEDULES) + sorted(CONTINUOUS)


def make_process(name: str = "linear", zero_terminal_snr: bool = False, T: int = 1000,
                 **kwargs: Any) -> Process:
    """Build a process by name: a discrete beta schedule (``linear``, ``cosine``, ...) over T
    steps, or a continuous one (``vpsde``, ``cosine_rates``, ``ve``, ``rectified_flow``);
    extra kwargs go to it."""
    if name in BETA_SCHEDULES:
        return DiscreteProcess(name, T=T, zero_terminal_snr=zero_terminal_snr, **kwargs)
    if name in CONTINUOUS:
        process = CONTINUOUS[name](**kwargs)
        if zero_terminal_snr and name == "ve":
            raise ValueError("zero terminal SNR needs a variance-preserving schedule, not 've'")
        if zero_terminal_snr and name == "rectified_flow":
            raise ValueError("--zero-terminal-snr: 'rectified_flow' already ends at zero SNR "
                             "(alpha(1) = 0); drop the option")
        return ZeroTerminalSNR(process) if zero_terminal_snr else process
    raise ValueError(f"unknown schedule {name!r}; choose from {PROCESS_NAMES}")


def process_from_config(config: dict[str, Any]) -> Process:
    """Inverse of ``Process.to_config``."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    ztsnr = cfg.pop("zero_terminal_snr", False)
    if kind == "discrete":
        return make_process(cfg.pop("schedule"), zero_terminal_snr=ztsnr, **cfg)
    return make_process(kind, zero_terminal_snr=ztsnr, **cfg)


__all__ = [
    "BETA_SCHEDULES", "CONTINUOUS", "PROCESS_NAMES", "VPSDE", "CosineRates", "DiscreteProcess",
    "Process", "RectifiedFlow", "VEProcess", "ZeroTerminalSNR", "as_time", "expand_like",
    "make_process", "markov_chain",
    "process_from_config", "q_sample", "q_step", "rescale_zero_terminal_snr", "transition",
]
