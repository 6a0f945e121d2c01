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
        self.baseline = rss_bytes()          # the process before the model
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


_warm: dict = {}


def warm_rss(method: str = "lora", dtype: torch.dtype = torch.float32) -> Optional[int]:
    """RSS of this process once torch's training code is resident: the first training step pages in kernels and
    autograd/optimizer code and starts the thread pools (~90 MiB with torch 2.13 on x86), which the RSS before
    the model does not show. Measured by one step of a 2-layer, 32-wide lorart Llama with `method` (~0.5 s, once
    per process and method); its tensors are freed before the reading."""
    key = (method, dtype)
    if key not in _warm:
        from ..methods import METHODS
        from ..methods.base import make_config
        from ..models import LlamaConfig, LlamaForCausalLM, apply_linear_factory
        from ..optim import PagedAdamW
        from ..training.options import TrainOptions
        from ..training.evaluate import autocast_ctx
        from ..training.setup import Base, attach_method, method_config
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            opts = TrainOptions(method=method, r=4, batch_size=2, max_seq_len=16).validate()
            cls = METHODS[method]
            mc = make_config(cls, method_config(opts, cls))
            model = LlamaForCausalLM(cfg).to(dtype)
            factory = cls.base_linear_factory(mc, dtype)
            if factory is not None:
                apply_linear_factory(model, factory)
            for q in model.parameters():
                q.requires_grad_(False)
            meth = attach_method(Base(model, None, None, True), cls, mc, opts)
            params = meth.trainable_parameters()
            opt = PagedAdamW(params, lr=1e-6)
            ids = torch.randint(0, 64, (2, 16))
            with autocast_ctx(torch.device("cpu"), dtype):   # as lorart.train runs its steps
                loss = model(input_ids=ids, labels=ids, loss_reduction="sum", return_logits=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            del model, meth, params, opt, ids, loss
        _warm[key] = rss_bytes()
    return _warm[key]


def env_allows_reset() -> bool:
    """True where the CPU peak can be reset per step (Linux /proc/self/clear_refs)."""
    return os.path.exists("/proc/self/clear_refs") and PeakMeter._reset_hwm()
