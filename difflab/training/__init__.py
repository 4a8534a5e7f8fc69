"""The one generic training loop and what it owns: EMA, precision, checkpoints, DDP."""

from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .ema import EMA
from .loop import (
    BatchSource,
    LoopConfig,
    LossFn,
    NonFiniteLossError,
    StepContext,
    TrainLoop,
    init_device,
    pick_device,
)
from .sinks import LOG_KINDS, MetricsSink, TensorBoardSink, TensorBoardUnavailable, check_log

__all__ = ["EMA", "LOG_KINDS", "BatchSource", "LoopConfig", "LossFn", "MetricsSink",
           "NonFiniteLossError", "StepContext", "TensorBoardSink", "TensorBoardUnavailable",
           "TrainLoop", "check_log", "init_device", "list_checkpoints", "load_checkpoint",
           "pick_device", "resolve_checkpoint", "save_checkpoint"]
