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


def interleaved_rounds(fns: dict, device: str, iters: int, warmup: int = 2) -> dict:
    """Seconds of every call of each fn, timed round-robin (one call of each per round), so that a change in
    machine load hits every contender alike: {name: [seconds of round 0, round 1, ...]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return times


def interleaved(fns: dict, device: str, iters: int, warmup: int = 2) -> dict:
    """Median seconds per call of each fn, timed round-robin (see interleaved_rounds)."""
    return {k: statistics.median(v) for k, v in interleaved_rounds(fns, device, iters, warmup).items()}


def round_ratio(rounds: dict, num: str, den: str) -> float:
    """Median over rounds of num's time / den's time in the same round: on a busy machine steadier than the
    ratio of the two medians (both calls of a round see about the same load)."""
    if num not in rounds or den not in rounds:
        return float("nan")
    return statistics.median(a / b for a, b in zip(rounds[num], rounds[den]))


def machine_load() -> str:
    """The 1-minute load average and the core count, for the record of how quiet a run was."""
    import os

    try:
        la = os.getloadavg()[0]
    except OSError:
        return "load unknown"
    return f"load {la:.2f} on {os.cpu_count()} cores"
