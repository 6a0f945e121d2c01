"""Step time of lorart.optim.PagedAdamW against torch.optim.AdamW (foreach, fused) and
bitsandbytes' PagedAdamW (when installed), states resident and paged; with 8-bit states
(state_bits=8) against bitsandbytes' AdamW8bit / PagedAdamW8bit.

    python bench/optim.py --device cuda [--json out.json]     # 10M and 1B parameters
    python bench/optim.py --device cpu --quick [--threads 1]   # a CPU smoke run

Ratios are taken within one run. For the paged configuration the script also measures
the pinned host<->device bandwidth (H2D and D2H concurrently, as the pager runs them) and
prints paged_bw_ratio = (time the state traffic needs at that bandwidth) / (step time).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

import lorart
from lorart.optim import PagedAdamW


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def _params(total: int, dev: str, piece: int):
    n = max(1, total // piece)
    sizes = [piece] * n
    ps = [torch.randn(s, device=dev).requires_grad_() for s in sizes]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    return ps


def _time_steps(opt, dev, warmup, iters) -> float:
    for _ in range(warmup):
        opt.step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        opt.step()
    _sync(dev)
    return (time.perf_counter() - t0) / iters


def _duplex_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s moved by concurrent pinned H2D + D2H copies (both directions counted)."""
    n = nbytes // 4
    h_src = torch.empty(n, pin_memory=True)
    h_dst = torch.empty(n, pin_memory=True)
    d_dst = torch.empty(n, device="cuda")
    d_src = torch.empty(n, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(s1):
            d_dst.copy_(h_src, non_blocking=True)
        with torch.cuda.stream(s2):
            h_dst.copy_(d_src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _contenders(dev: str):
    c = {}
    if dev == "cuda":
        c["torch_foreach"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)
        c["torch_fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
        c["lorart_resident"] = lambda ps: PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=1 << 50)
        c["lorart_paged"] = lambda ps: PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=0)
        c["lorart8_resident"] = lambda ps: PagedAdamW(ps, lr=1e-4, state_bits=8, gpu_budget_bytes=1 << 50)
        c["lorart8_paged"] = lambda ps: PagedAdamW(ps, lr=1e-4, state_bits=8, gpu_budget_bytes=0)
        try:
            import bitsandbytes as bnb  # noqa: F401
            c["bnb_paged_adamw"] = lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-4)
            c["bnb_adamw8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
            c["bnb_paged_adamw8bit"] = lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4)
        except Exception as e:  # noqa: BLE001
            print(f"bitsandbytes unavailable: {e}", file=sys.stderr)
    else:
        c["torch_single"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False)
        c["torch_foreach"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)
        c["torch_fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
        c["lorart"] = lambda ps: PagedAdamW(ps, lr=1e-4)
        c["lorart8"] = lambda ps: PagedAdamW(ps, lr=1e-4, state_bits=8)
        try:  # bitsandbytes' paged optimizers need CUDA; its plain ones run on the CPU
            import bitsandbytes as bnb  # noqa: F401
            c["bnb_adamw"] = lambda ps: bnb.optim.AdamW(ps, lr=1e-4)
            c["bnb_adamw8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
        except Exception as e:  # noqa: BLE001
            print(f"bitsandbytes unavailable: {e}", file=sys.stderr)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke run)")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated parameter counts")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of torch and lorart (default: theirs)")
    args = ap.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
        lorart._C.set_num_threads(args.threads)
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [10_000_000] if dev == "cuda" else [1_000_000]
    else:
        sizes = [10_000_000, 1_000_000_000] if dev == "cuda" else [10_000_000]
    results = {"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
               "threads": lorart._C.get_num_threads(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "runs": []}
    if dev == "cuda":
        bw = _duplex_bandwidth()
        results["pinned_duplex_bandwidth_GBps"] = bw / 1e9
        print(f"pinned H2D+D2H (concurrent) bandwidth: {bw / 1e9:.1f} GB/s", flush=True)
    for total in sizes:
        piece = min(total, 16 << 20) if dev == "cuda" else min(total, 1 << 20)
        iters = args.iters or (3 if total >= 500_000_000 else 20)
        row = {"params": total, "ms": {}}
        for name, make in _contenders(dev).items():
            ps = _params(total, dev, piece)
            try:
                opt = make(ps)
                row["ms"][name] = 1e3 * _time_steps(opt, dev, 2, iters)
                if name in ("lorart_paged", "lorart8_paged"):
                    rep = opt.memory_report()
                    row[f"{name}_bytes_per_step"] = rep["paged_h2d_bytes_per_step"] + rep["paged_d2h_bytes_per_step"]
            except (RuntimeError, MemoryError) as e:
                print(f"{name} @ {total}: {e}", file=sys.stderr)
            del ps
            opt = None
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
        ms = row["ms"]
        pairs = [(ours, ref) for ours in ("lorart_resident", "lorart")
                 for ref in ("torch_fused", "torch_foreach", "torch_single", "bnb_adamw", "bnb_paged_adamw")]
        pairs += [("lorart8_resident", "bnb_adamw8bit"), ("lorart8", "bnb_adamw8bit"), ("lorart8", "lorart"),
                  ("lorart8_resident", "lorart_resident"), ("lorart8_paged", "bnb_paged_adamw8bit")]
        for ours, ref in pairs:
            if ref in ms and ours in ms:
                row[f"{ours}_vs_{ref}"] = ms[ours] / ms[ref]
        for name, key in (("lorart_paged", "paged_bw_ratio"), ("lorart8_paged", "paged8_bw_ratio")):
            if name in ms and dev == "cuda":
                ideal = row[f"{name}_bytes_per_step"] / results["pinned_duplex_bandwidth_GBps"] / 1e9
                row[key] = ideal / (ms[name] / 1e3)
        results["runs"].append(row)
        print(f"params={total:,}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
        for k, v in row.items():
            if "_vs_" in k or k.endswith("bw_ratio"):
                print(f"  {k}: {v:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
