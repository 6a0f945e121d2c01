"""Bottleneck adapter cost: lorart.nn.BottleneckAdapter (down GEMM, activation, up GEMM, residual) against its
two GEMMs alone (the floor any fused kernel could reach) and against the decoder layer it sits in.

    python bench/methods.py --device cpu --quick
    python bench/methods.py --device cuda
"""
from __future__ import annotations

import argparse

import torch
from _timing import timeit as _timeit

from lorart.nn import BottleneckAdapter


def timeit(fn, device: str, iters: int) -> float:
    """Median milliseconds per call."""
    return 1e3 * _timeit(fn, device, iters)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = args.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    shapes = [(576, 32, 512)] if args.quick else [(576, 32, 512), (4096, 64, 4096), (4096, 256, 4096)]
    print("| hidden | bottleneck | rows | adapter ms | two GEMMs ms | adapter / GEMMs | d x d linear ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for h, b, m in shapes:
        ad = BottleneckAdapter(h, b).to(dev, dtype)
        torch.nn.init.normal_(ad.up.weight, std=0.01)
        x = torch.randn(m, h, device=dev, dtype=dtype)
        lin = torch.nn.Linear(h, h, device=dev, dtype=dtype)
        iters = 20 if args.quick else 100
        t_ad = timeit(lambda: ad(x), dev, iters)
        t_mm = timeit(lambda: torch.addmm(ad.up.bias, torch.addmm(ad.down.bias, x, ad.down.weight.t()),
                                          ad.up.weight.t()), dev, iters)
        t_lin = timeit(lambda: lin(x), dev, iters)
        print(f"| {h} | {b} | {m} | {t_ad:.3f} | {t_mm:.3f} | {t_ad / t_mm:.2f} | {t_lin:.3f} |")


if __name__ == "__main__":
    main()
