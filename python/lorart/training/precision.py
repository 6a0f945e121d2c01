"""Dynamic loss scaling for float16 training (torch.amp.GradScaler), and what a step's numbers mean with it.

float16 has 5 exponent bits: small gradients underflow to zero unless the loss is multiplied by a large scale
before backward (and the gradients divided by it before clipping and the update). The scale starts at
INIT_SCALE, is halved after every step whose scaled gradients overflowed (inf/NaN) and doubled after
GROWTH_INTERVAL clean steps. An overflowed step is skipped (no update) and is *not* a non-finite step: it says
the scale was too large, not that training diverged. A gradient that is still not finite at a scale of
MIN_SCALE (or a non-finite loss, which no scale explains) is: it goes to the recipe's non-finite rule
(`skip_nonfinite`, else the run stops). bfloat16 and float32 need no scaling: the scaler is then a no-op.
"""
from __future__ import annotations

import math

import torch

from .options import OptionError

INIT_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000
MIN_SCALE = 1.0


def check_method(method_cls, dtype: torch.dtype) -> None:
    """float16 needs float32 trainable weights: the scaled gradients of float16 weights overflow, and torch's
    GradScaler refuses to unscale them. A method that keeps its tensors in the layers' dtype (BitFit) cannot train
    in float16: OptionError, before anything loads."""
    if dtype == torch.float16 and method_cls.keeps_dtypes:
        raise OptionError("dtype", f"float16 trains with loss scaling, which needs float32 trainable weights, but "
                                   f"method {method_cls.name!r} keeps its trainable tensors in the layers' dtype; "
                                   "use dtype 'bfloat16' or 'float32'")


class LossScaler:
    def __init__(self, device: torch.device, dtype: torch.dtype, optimizer):
        self.enabled = dtype == torch.float16
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(device.type, init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL,
                                           enabled=self.enabled)

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        return float(self.scaler.get_scale()) if self.enabled else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self) -> None:
        """Divide the accumulated gradients by the scale (before clipping and the gradient norm)."""
        if self.enabled:
            self.scaler.unscale_(self.optimizer)

    def outcome(self, loss: float, grad_norm: float) -> str:
        """"ok" (apply the step), "overflow" (the scale was too large: skip, lower it) or "nonfinite" (the loss
        or the gradient is not finite whatever the scale: the recipe's non-finite rule)."""
        if not math.isfinite(loss):
            return "nonfinite"
        if math.isfinite(grad_norm):
            return "ok"
        return "overflow" if self.enabled and self.scale > MIN_SCALE else "nonfinite"

    def step(self, outcome: str) -> None:
        """Apply the update when `outcome` is "ok", then adjust the scale (halved after an overflow, never below
        MIN_SCALE). Call `unscale()` first: the scaler reads the overflow it found there."""
        if outcome == "ok":
            self.scaler.step(self.optimizer)
        if self.enabled:
            self.scaler.update()
            if self.scale < MIN_SCALE:
                self.scaler.update(MIN_SCALE)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)


__all__ = ["LossScaler", "check_method", "INIT_SCALE", "GROWTH_INTERVAL", "MIN_SCALE"]
