"""Timing shared by the benchmarks (run as `python bench/<name>.py`, so this folder is on sys.path)."""
from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, device: str, iters: int, warmup: int = 3) -> float:
    """Median seconds per call: CUDA events around each call on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)
