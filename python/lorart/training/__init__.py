"""Fine-tuning: `lorart.train(...)` -> TrainResult (see docs/train.md); `lorart.compare(...)` of several methods."""
from .checkpoint import latest_checkpoint
from .folder import TrainingError
from .options import DEFAULT_FORMAT_REGEX, DEFAULT_TARGETS, TrainOptions
from .recipe import NonFiniteError, Recipe, RunState
from .result import TrainResult
from .run import train

__all__ = ["train", "TrainResult", "TrainOptions", "Recipe", "RunState", "TrainingError", "NonFiniteError",
           "latest_checkpoint", "DEFAULT_TARGETS", "DEFAULT_FORMAT_REGEX"]
