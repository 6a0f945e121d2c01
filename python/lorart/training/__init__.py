"""Fine-tuning: `lorart.train(...)` -> TrainResult (see docs/train.md); `lorart.compare(...)` of several methods."""
from .checkpoint import latest_checkpoint
from .folder import TrainingError
from .options import DEFAULT_FORMAT_REGEX, DEFAULT_TARGETS, TrainOptions
from .recipe import Recipe
from .recipe_steps import NonFiniteError
from .result import TrainResult
from .run import train
from .run_state import RunState

__all__ = ["train", "TrainResult", "TrainOptions", "Recipe", "RunState", "TrainingError", "NonFiniteError",
           "latest_checkpoint", "DEFAULT_TARGETS", "DEFAULT_FORMAT_REGEX"]
