"""RunState: the progress of a training run (`Recipe.state`, recipe.py), saved in every checkpoint beside the
weights, optimizer, scheduler and RNG states."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class RunState:
    """The progress of a run, saved in every checkpoint."""
    step: int = 0                  # optimizer steps done
    epoch: int = 0
    pos: int = 0                   # micro-batches of this epoch's order consumed
    tokens: int = 0
    train_time_s: float = 0.0
    history: list = field(default_factory=list)         # the metrics.jsonl records
    before: Optional[dict] = None                       # metrics before training
    samples_before: list = field(default_factory=list)
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    best_weights: Optional[dict] = None                 # with early stopping: the trainable weights of best_step
    stopped_early: bool = False
    skipped: list = field(default_factory=list)         # steps skipped for a non-finite loss / gradient norm
    overflow_steps: list = field(default_factory=list)  # float16: steps skipped for a loss-scale overflow
    trackers: dict = field(default_factory=dict)        # the experiment trackers' run names (reporting.py)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

