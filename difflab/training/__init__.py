"""Generic training: config, EMA, checkpoints, the loop."""

from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import MODEL_SIZES, TrainConfig, read_config_file
from .ema import EMA
from .trainer import NonFiniteLossError, Trainer, pick_device

__all__ = ["EMA", "MODEL_SIZES", "NonFiniteLossError", "TrainConfig", "Trainer",
           "list_checkpoints", "load_checkpoint", "pick_device", "read_config_file",
           "resolve_checkpoint", "save_checkpoint"]
