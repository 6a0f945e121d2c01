"""Measured peak memory of training steps, and the plan's prediction for a live run (lorart.train).

CPU: the resident-set high-water mark (VmHWM) of this process, reset through /proc/self/clear_refs before each
step, so loading, evaluation and checkpoint writes between steps do not count; where that reset is not allowed
the whole-process peak (ru_maxrss) is reported and said so. CUDA: torch.cuda.max_memory_allocated, reset before
each step (tensors only: the CUDA context and the allocator's cached-but-free blocks are not in it).
"""
from __future__ import annotations

import os
import re
import resource
from typing import Optional

import torch


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{key}:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> Optional[int]:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


class PeakMeter:
    """meter.start() before a step, meter.stop() after it; meter.peak is the largest step peak (bytes)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0
        self.baseline = rss_bytes()          # the process before the model: the plan's framework part on CPU
        if self.device.type == "cuda":
            self.what = "torch.cuda.max_memory_allocated during the training steps"
            self._resettable = True
        else:
            self._resettable = self._reset_hwm()
            self.what = ("peak RSS during the training steps (VmHWM reset before each step)" if self._resettable else
                         "peak RSS of the whole process (ru_maxrss: this system does not allow resetting it)")

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            self._reset_hwm()

    def stop(self) -> None:
        if self.device.type == "cuda":
            now = torch.cuda.max_memory_allocated(self.device)
        elif self._resettable:
            now = (_status_kb("VmHWM") or 0) * 1024
        else:
            now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = max(self.peak, now)


def predict_run(model, method, train_options, device: torch.device, batch_size: int, seq_len: int,
                framework_bytes: Optional[int]) -> dict:
    """The plan of a live `lorart.train` run (its own model and method, the longest batch it will see).
    Returns {"predicted_peak_bytes", "predicted_parts", ...} or {"predicted_peak_bytes": None, "plan_note"}."""
    import dataclasses

    from . import memory
    from .spec import PlanOptions, setup_from_model
    try:
        opts = PlanOptions(train=dataclasses.replace(train_options, batch_size=batch_size, max_seq_len=seq_len),
                           device=device.type)
        mem = memory.estimate(setup_from_model(model, method, opts))
    except (NotImplementedError, AttributeError, TypeError, ValueError) as e:
        return {"predicted_peak_bytes": None, "plan_note": f"no prediction for this model: {e}"}
    fw = (framework_bytes or 0) if device.type == "cpu" else 0
    return {"predicted_peak_bytes": mem.peak + fw, "predicted_parts": dict(mem.parts), "predicted_phase": mem.phase,
            "framework_bytes": fw, "predicted_batch": [batch_size, seq_len]}


def env_allows_reset() -> bool:
    """True where the CPU peak can be reset per step (Linux /proc/self/clear_refs)."""
    return os.path.exists("/proc/self/clear_refs") and PeakMeter._reset_hwm()
