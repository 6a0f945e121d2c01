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


MMAP_THRESHOLD = 128 << 10   # glibc's own initial threshold, its dynamic raising turned off
# the measured RSS under glibc's default heap over the plan's prediction, a little above the largest seen
# (SmolLM2-135M, every method, with and without checkpointing, batch 8 x 160, glibc 2.36: 1.17-1.81; docs/plan.md)
GLIBC_HEAP_RATIO = 1.85
_malloc_state: dict = {}


def malloc_mode() -> str:
    """LORART_MALLOC: "return" (glibc gives freed memory back: RSS follows the plan, steps slower), "keep"
    (glibc's default heap: fastest, RSS up to GLIBC_HEAP_RATIO x the plan) or "auto" (the default: keep, unless
    the plan says keeping would not fit in the memory this process can still get)."""
    v = os.environ.get("LORART_MALLOC", "auto").strip().lower() or "auto"
    if v == "default":
        v = "keep"
    if v not in ("return", "keep", "auto"):
        raise ValueError(f"lorart: environment variable LORART_MALLOC: expected return, keep or auto, got {v!r}")
    return v


def return_freed_memory(threshold: int = MMAP_THRESHOLD, force: bool = False) -> str:
    """Make glibc serve allocations >= `threshold` bytes with their own mmap (and give them back to the OS when
    freed) for the rest of the process: mallopt(M_MMAP_THRESHOLD), which also turns off glibc's dynamic
    threshold. Without it, the first large free raises the threshold, later activations come from the heap and
    the heap keeps them after they are freed: RSS stays a few hundred MiB above the live tensors (docs/plan.md).
    It costs time (every activation a fresh mmap whose pages the kernel zeroes: SmolLM2 LoRA steps +25%, QLoRA
    +55% on the 2-core CPU of docs/plan.md, for 40% less peak RSS): done with LORART_MALLOC=return, or `force`
    (memory_headroom's decision), never when MALLOC_MMAP_THRESHOLD_ is set (glibc read it already).
    Returns what was done ("fixed" | "default" | "env" | "unavailable"); fixed stays fixed for the process."""
    mode = malloc_mode()   # a mistyped LORART_MALLOC is refused here, at setup, before any loading
    if _malloc_state.get("how") in ("fixed", "env"):
        return _malloc_state["how"]
    how = "default"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        how = "env"
    elif force or mode == "return":
        how = "unavailable"
        try:
            import ctypes
            libc = ctypes.CDLL(None)
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold) == 1:
                libc.malloc_trim(0)   # and give back what the heap holds now
                how = "fixed"
        except (OSError, AttributeError):   # not glibc (musl, macOS, Windows)
            pass
    _malloc_state["how"] = how
    return how


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            v = f.read().strip()
        return None if v in ("", "max") else int(v)
    except (OSError, ValueError):
        return None


def _stat_int(path: str, key: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return None


def available_bytes() -> Optional[int]:
    """The memory this process can still take: the kernel's MemAvailable, or less where its cgroup (v2
    memory.max, v1 memory.limit_in_bytes, less the working set: usage without inactive page cache) leaves less;
    None where neither can be read."""
    kb = None
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+)\s+kB", f.read())
        kb = int(m.group(1)) if m else None
    except OSError:
        pass
    avail = None if kb is None else kb * 1024
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hid, ctrl, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and ctrl == "":
            base = f"/sys/fs/cgroup{path}"
            limit, used = _read_int(f"{base}/memory.max"), _read_int(f"{base}/memory.current")
            cache = _stat_int(f"{base}/memory.stat", "inactive_file")
        elif "memory" in ctrl.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            if not os.path.isdir(base):
                base = "/sys/fs/cgroup/memory"
            limit, used = _read_int(f"{base}/memory.limit_in_bytes"), _read_int(f"{base}/memory.usage_in_bytes")
            cache = _stat_int(f"{base}/memory.stat", "total_inactive_file")
        else:
            continue
        if used is not None:   # the working set: inactive page cache is reclaimed before anything is killed
            used = max(used - (cache or 0), 0)
        if limit is not None and used is not None and limit < (1 << 60):   # v1 says "no limit" with ~2^63
            avail = max(limit - used, 0) if avail is None else min(avail, max(limit - used, 0))
    return avail


def memory_headroom(predicted_peak: Optional[int], rss_now: Optional[int], available: Optional[int],
                    mode: str) -> tuple:
    """Decide glibc's heap mode for a CPU run from the plan: (return_memory, why). With mode "auto", memory is
    returned when keeping glibc's heap (up to GLIBC_HEAP_RATIO x the plan) would need more than this process can
    still get; why says so, and warns when even the plan itself does not fit."""
    if mode == "return":
        return True, "LORART_MALLOC=return"
    if predicted_peak is None or rss_now is None or available is None:
        return False, None
    gib = 2 ** 30
    need = predicted_peak - rss_now   # what the steps still add to this process
    if need > available:
        return mode == "auto", (f"the plan's peak {predicted_peak / gib:.2f} GiB needs {need / gib:.2f} GiB more, "
                                f"{available / gib:.2f} GiB available: this run may be killed for memory (smaller "
                                f"batch_size or max_seq_len, gradient_checkpointing, or qlora; `lorart plan`)")
    if mode == "auto" and predicted_peak * GLIBC_HEAP_RATIO - rss_now > available:
        return True, (f"memory is tight (plan {predicted_peak / gib:.2f} GiB, up to "
                      f"{predicted_peak * GLIBC_HEAP_RATIO / gib:.2f} GiB with glibc's heap, {available / gib:.2f} "
                      f"GiB more available): freed memory goes back to the system (slower steps; LORART_MALLOC="
                      f"keep turns this off; docs/plan.md)")
    return False, None


def choose_malloc(plan: dict) -> Optional[str]:
    """After the plan of a CPU run (predict_run's memory dict, updated in place: "malloc", "malloc_why"): give freed
    memory back where LORART_MALLOC says so or where keeping glibc's heap would not fit (memory_headroom).
    Returns what to tell the user, or None."""
    mode = malloc_mode()
    back, why = memory_headroom(plan.get("predicted_peak_bytes"), rss_bytes(), available_bytes(), mode)
    if back:
        return_freed_memory(force=True)
    plan["malloc"] = _malloc_state.get("how", "default")
    if why:
        plan["malloc_why"] = why
    return why if mode != "return" else None   # the user asked for it: nothing to tell


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
                framework_bytes: Optional[int], time: bool = True) -> tuple:
    """The plan of a live `lorart.train` run (its own model and method, the longest batch it will see):
    (memory, step_time). memory: {"predicted_peak_bytes", "predicted_parts", ...} or {"predicted_peak_bytes":
    None, "plan_note"}; step_time: {"predicted_step_s", "gemm_tflops", "flops_per_step", "source"} (the GEMM rate
    measured here now: ~0.5 s) or {} when not estimated."""
    import dataclasses

    from . import memory, speed
    from .spec import PlanOptions, setup_from_model
    try:
        opts = PlanOptions(train=dataclasses.replace(train_options, batch_size=batch_size, max_seq_len=seq_len),
                           device=device.type)
        setup = setup_from_model(model, method, opts)
        mem = memory.estimate(setup)
    except (NotImplementedError, AttributeError, TypeError, ValueError) as e:
        return {"predicted_peak_bytes": None, "plan_note": f"no prediction for this model: {e}"}, {}
    fw = (framework_bytes or 0) if device.type == "cpu" else 0
    plan = {"predicted_peak_bytes": mem.peak + fw, "predicted_parts": dict(mem.parts), "predicted_phase": mem.phase,
            "framework_bytes": fw, "predicted_batch": [batch_size, seq_len]}
    if device.type == "cpu":
        plan["framework_what"] = "RSS before the first step less the model's tensors"
    step = {}
    if time:
        est = speed.estimate(setup)
        step = {"predicted_step_s": est["step_s"], "gemm_tflops": est["gemm_tflops"],
                "flops_per_step": est["flops"]["total"], "predicted_batch": [batch_size, seq_len],
                "source": est["source"]}
    return plan, step


def step_time_check(predicted: dict, history: list) -> dict:
    """The predicted time per step beside the measured ones: the mean over the run's steps (the first included:
    it pages code in) and the median of the steps after the first; ratio = measured median / predicted."""
    t = [h["elapsed_s"] for h in history if "elapsed_s" in h and "step" in h]
    per = [b - a for a, b in zip([0.0] + t[:-1], t)]
    out = dict(predicted)
    out["measured_mean_step_s"] = sum(per) / len(per) if per else None
    rest = sorted(per[1:] or per)
    out["measured_step_s"] = rest[len(rest) // 2] if rest else None
    pred = predicted.get("predicted_step_s")
    out["ratio"] = out["measured_step_s"] / pred if pred and out["measured_step_s"] else None
    return out


def tensor_bytes(module) -> int:
    """Bytes of the distinct CPU storages of `module`'s parameters and buffers (tied weights once)."""
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "cpu" and not t.is_meta:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def process_bytes(model, floor: Optional[int]) -> Optional[int]:
    """The process without the model: RSS now less the model's tensors, read just before training (so what
    loading left resident counts: the tokenizer, the data, file readers), never below `floor` (warm_rss: the
    model's pages may not all be resident yet). Garbage is collected first: an earlier run's model in the same
    process (a notebook's second lorart.train) is often held by reference cycles until the collector runs, which
    would otherwise happen during the steps and leave this reading too high."""
    import gc
    gc.collect()
    now = rss_bytes()
    if now is None:
        return floor
    return max(now - tensor_bytes(model), floor or 0)


_warm: dict = {}


def warm_rss(method: str = "lora", dtype: torch.dtype = torch.float32) -> Optional[int]:
    """RSS of this process once torch's training code is resident: the first training step pages in kernels and
    autograd/optimizer code and starts the thread pools (~90 MiB with torch 2.13 on x86), which the RSS before
    the model does not show. Measured by one step of a 2-layer, 32-wide lorart Llama with `method` (~0.5 s, once
    per process and method); its tensors are freed before the reading."""
    key = (method, dtype)
    if key not in _warm:
        from ..models import LlamaConfig
        from ..optim import PagedAdamW
        from ..training.options import TrainOptions
        from ..training.evaluate import autocast_ctx
        from ..training.setup import random_model_with_method
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            opts = TrainOptions(method=method, r=4, batch_size=2, max_seq_len=16).validate()
            model, meth = random_model_with_method(cfg, opts, dtype)
            params = meth.trainable_parameters()
            opt = PagedAdamW(params, lr=1e-6)
            ids = torch.randint(0, 64, (2, 16))
            with autocast_ctx(torch.device("cpu"), dtype):   # as lorart.train runs its steps
                loss = model(input_ids=ids, labels=ids, loss_reduction="sum", return_logits=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            del model, meth, params, opt, ids, loss
        import gc
        gc.collect()   # and an earlier run's model held by reference cycles (a notebook's second lorart.train)
        _warm[key] = rss_bytes()
    return _warm[key]


def env_allows_reset() -> bool:
    """True where the CPU peak can be reset per step (Linux /proc/self/clear_refs)."""
    return os.path.exists("/proc/self/clear_refs") and PeakMeter._reset_hwm()
