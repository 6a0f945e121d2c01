"""TrainOptions: every knob of `lorart.train`, validated once with errors naming the argument."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence, Union

from ..errors import InputError
from ..methods import METHODS

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# the answer format of the bundled default data (python/lorart/data/default)
DEFAULT_FORMAT_REGEX = r"ANSWER: [^|\n]*\S[^|\n]* \| CONFIDENCE: (high|medium|low)"
TRACKERS = ("tensorboard", "wandb", "mlflow")   # report_to: the experiment trackers lorart.training.reporting knows


class OptionError(InputError):
    """A TrainOptions field with a bad value: `name` is the field, `detail` what was expected and what came (the
    config-file loader re-words it as `FILE: key `name`: detail`)."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"lorart.train: argument `{name}`: {detail}")
        self.name, self.detail = name, detail


@dataclass
class TrainOptions:
    method: str = "lora"                     # a lorart.methods name: full lora qlora adapter prefix prompt bitfit
    method_options: Optional[dict] = None    # the method's own options (lorart.methods.METHODS[m].Config fields)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: Union[str, Sequence[str]] = DEFAULT_TARGETS
    rslora: bool = False
    lr: float = 2e-4
    epochs: int = 1
    max_steps: Optional[int] = None          # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    warmup: float = 0.05                     # steps (int >= 1) or a fraction of the steps (< 1)
    schedule: str = "cosine"                 # "cosine" | "linear" | "constant" (after warmup)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    skip_nonfinite: int = 0                  # steps with a non-finite loss / gradient norm skipped before stopping
    eval_every: Optional[int] = None         # None: a quarter of the steps
    save_every: Optional[int] = None         # None: at every evaluation
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = 0.0
    gradient_checkpointing: bool = False
    packing: bool = False
    seed: int = 0
    eval_fraction: float = 0.1               # used when no eval_data is given (not for the default data)
    eval_before: bool = True                 # False skips the evaluation before training (lorart compare)
    num_samples: int = 8                     # held-out prompts generated before/after (samples.md)
    sample_max_new_tokens: int = 32
    format_regex: Optional[str] = None       # None: the default data's answer format, only for that data
    log_every: int = 1
    keep_checkpoints: int = 2
    dtype: Optional[str] = None              # None: setup.resolve_dtype (bf16 on native-bf16 CPUs); fp16: loss scaling
    report_to: Union[str, Sequence[str]] = "none"  # "none" or TRACKERS names (a list or comma-separated)
    fsdp: bool = False                       # under torchrun: shard with FSDP2 instead of replicating (DDP)
    dist_timeout: float = 600.0              # seconds a rank waits for the others before it stops (torchrun)
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainOptions":
        def bad(name, expected, got):
            raise OptionError(name, f"expected {expected}, got {got!r}")

        if self.method not in METHODS:
            bad("method", "one of " + ", ".join(METHODS), self.method)
        if self.method_options is not None and not isinstance(self.method_options, dict):
            bad("method_options", "None or a dict of the method's options", self.method_options)
        for name in ("r", "epochs", "batch_size", "grad_accum", "max_seq_len", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "an int >= 1", v)
        if self.max_seq_len < 8:
            bad("max_seq_len", "an int >= 8", self.max_seq_len)
        if isinstance(self.skip_nonfinite, bool) or not isinstance(self.skip_nonfinite, int) or self.skip_nonfinite < 0:
            bad("skip_nonfinite", "an int >= 0 (steps with a non-finite loss or gradient norm to skip)",
                self.skip_nonfinite)
        for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                bad(name, "None or an int >= 1", v)
        for name in ("alpha", "lr", "weight_decay", "min_lr_ratio", "early_stopping_min_delta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "a finite number >= 0", v)
        if self.lr <= 0:
            bad("lr", "a number > 0", self.lr)
        if self.min_lr_ratio > 1:
            bad("min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "a number in [0, 1)", self.dropout)
        if not 0.0 <= self.eval_fraction < 1.0:
            bad("eval_fraction", "a number in [0, 1)", self.eval_fraction)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)) or self.warmup < 0 or (
                isinstance(self.warmup, float) and not self.warmup < 1 and not float(self.warmup).is_integer()):
            bad("warmup", "a step count (int >= 0) or a fraction of the steps in [0, 1)", self.warmup)
        if self.schedule not in ("cosine", "linear", "constant"):
            bad("schedule", "'cosine', 'linear' or 'constant'", self.schedule)
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            bad("max_grad_norm", "None or a number > 0", self.max_grad_norm)
        if not isinstance(self.num_samples, int) or self.num_samples < 0:
            bad("num_samples", "an int >= 0", self.num_samples)
        if not isinstance(self.sample_max_new_tokens, int) or self.sample_max_new_tokens < 1:
            bad("sample_max_new_tokens", "an int >= 1", self.sample_max_new_tokens)
        if not isinstance(self.fsdp, bool):
            bad("fsdp", "True or False", self.fsdp)
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) or not (
                math.isfinite(self.dist_timeout) and self.dist_timeout >= 1):
            bad("dist_timeout", "a finite number of seconds >= 1", self.dist_timeout)
        if self.dtype not in (None, "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            bad("dtype", "None, 'float32', 'bfloat16' or 'float16'", self.dtype)
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                bad("targets", "module names, a regex or 'all-linear'", self.targets)
            self.targets = tuple(self.targets)
        elif not isinstance(self.targets, str) or not self.targets:
            bad("targets", "module names, a regex or 'all-linear'", self.targets)
        if self.format_regex is not None:
            try:
                re.compile(self.format_regex)
            except re.error as e:
                raise OptionError("format_regex", f"invalid regex: {e}") from None
        self.report_to = self.trackers()
        return self

    def trackers(self) -> tuple:
        """report_to as a tuple of TRACKERS names ("none" -> ()); OptionError for anything else."""
        v = self.report_to
        names = [t.strip() for t in v.split(",")] if isinstance(v, str) else v
        if not isinstance(names, (list, tuple)) or not all(isinstance(t, str) for t in names):
            raise OptionError("report_to", f"expected 'none' or some of {', '.join(TRACKERS)}, got {v!r}")
        names = [t for t in names if t and t != "none"]
        bad = [t for t in names if t not in TRACKERS]
        if bad:
            raise OptionError("report_to", f"expected 'none' or some of {', '.join(TRACKERS)}, got {bad[0]!r}")
        return tuple(dict.fromkeys(names))

    @classmethod
    def from_keywords(cls, options: dict) -> "TrainOptions":
        """Validated options from lorart.train's keywords; an unknown keyword is a TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"lorart.train: unknown argument(s) {', '.join(map(repr, unknown))}; expected one of "
                            f"{', '.join(option_names())}")
        return cls(**options).validate()

    def warmup_steps(self, total: int) -> int:
        w = self.warmup
        return int(w) if (isinstance(w, int) or w >= 1) else int(round(w * total))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("targets", "report_to"):
            d[k] = d[k] if isinstance(d[k], str) else list(d[k])
        return d

    # options that change the training trajectory: a checkpoint only resumes a run with the same ones
    TRAJECTORY = ("method", "method_options", "r", "alpha", "dropout", "targets", "rslora", "lr", "epochs", "max_steps",
                  "batch_size", "grad_accum", "max_seq_len", "warmup", "schedule", "min_lr_ratio", "weight_decay",
                  "max_grad_norm", "packing", "seed", "eval_fraction", "dtype", "early_stopping_patience",
                  "early_stopping_min_delta")

    def fingerprint(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in self.TRAJECTORY}


def parse_targets(s: str):
    """A targets string as the command line and config files read it: "all-linear" and regexes stay a string,
    "q_proj,v_proj" becomes a tuple of module names."""
    if s == "all-linear" or any(c in s for c in "^$*+?[]()\\|"):
        return s
    return tuple(t.strip() for t in s.split(",") if t.strip())


def option_names() -> list:
    return [f.name for f in fields(TrainOptions) if f.name != "extra"]
