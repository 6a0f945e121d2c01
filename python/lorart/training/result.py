"""TrainResult: what `lorart.train` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    metrics_path: str
    summary_path: str
    samples_path: Optional[str]
    plot_path: Optional[str]
    steps: int
    total_steps: int
    epochs: float
    stopped_early: bool
    best_step: Optional[int]
    before: dict          # eval_loss, eval_ppl, general_ppl, format_accuracy before training
    after: dict           # the same after training
    train_loss: Optional[float]   # mean loss of the last min(10, steps) steps that were applied
    train_time_s: float
    tokens_per_s: float
    memory: dict          # peak_rss_mb (+ peak_gpu_allocated_mb)
    history: list = field(repr=False, default_factory=list)
    samples_before: list = field(repr=False, default_factory=list)
    samples_after: list = field(repr=False, default_factory=list)
    notes: list = field(default_factory=list)
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)
    method: Any = field(repr=False, default=None)   # the lorart.methods.Method trained (report(), merge(), ...)
    skipped_steps: list = field(default_factory=list)   # steps skipped for a non-finite loss (skip_nonfinite)
    overflow_steps: list = field(default_factory=list)  # float16: steps skipped for a loss-scale overflow


def format_metrics(mt: dict) -> str:
    parts = []
    if mt.get("eval_loss") is not None:
        parts.append(f"held-out loss {mt['eval_loss']:.4f} (ppl {mt['eval_ppl']:.2f})")
    if mt.get("format_accuracy") is not None:
        parts.append(f"format accuracy {mt['format_accuracy']:.0%}")
    if mt.get("general_ppl") is not None:
        parts.append(f"general-text ppl {mt['general_ppl']:.2f}")
    return ", ".join(parts) or "no held-out data"
