"""Fine-tuning loop: `lorart.train(...)` -> TrainResult (see docs/train.md)."""
from .checkpoint import latest_checkpoint
from .loop import TrainResult, train
from .options import DEFAULT_FORMAT_REGEX, DEFAULT_TARGETS, TrainOptions

__all__ = ["train", "TrainResult", "TrainOptions", "latest_checkpoint", "DEFAULT_TARGETS", "DEFAULT_FORMAT_REGEX"]
