"""LoRA benchmarks: fwd and fwd+bwd of a LoRA linear against the bare base linear and a PEFT-style reference
(plain torch: base(x) + B(A(dropout(x))) * s), dense bf16 and NF4 bases, r = 8, 16, 64, Llama-7B shapes,
M = 1 and 4096; plus a mixed batch (32 rows, 32 adapters) against a single-adapter batch. One run, ratios,
peak memory.

    python bench/lora.py --device cuda [--json out.json]
    python bench/lora.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from _timing import timeit
from torch import nn

import lorart  # noqa: F401
from lorart.nn import LoRALinear, NF4Linear

LLAMA = [(4096, 4096), (4096, 11008)]  # (in, out): q_proj, up_proj
QUICK = [(512, 512)]


def peak_bytes(fn, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


class PeftStyle(nn.Module):
    """The PEFT forward in plain torch: base(x) + lora_B(lora_A(dropout(x))) * scaling."""

    def __init__(self, base, A, B, scaling, p):
        super().__init__()
        self.base, self.A, self.B, self.s = base, A, B, scaling
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(self, x):
        return self.base(x) + self.B(self.A(self.drop(x))) * self.s


def step(mod, x, backward: bool):
    def run():
        y = mod(x)
        if backward:
            y.backward(torch.ones_like(y))
            for p in mod.parameters():
                p.grad = None
            x.grad = None
    return run


def bench_linear(K, N, M, r, base_kind, device, iters, p):
    dt = torch.bfloat16
    lin = nn.Linear(K, N, bias=False, device=device, dtype=dt)
    lin.weight.requires_grad_(False)
    base = NF4Linear.from_linear(lin) if base_kind == "nf4" else lin
    layer = LoRALinear(base, r=r, alpha=2 * r, dropout=p).train()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.01)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    peft = PeftStyle(base, A, B, layer.scaling["default"], p).train()
    x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
    row = {"K": K, "N": N, "M": M, "r": r, "base": base_kind}
    for tag, bwd in (("fwd", False), ("fwdbwd", True)):
        ctx = torch.enable_grad() if bwd else torch.no_grad()
        with ctx:
            t_base = timeit(step(base, x, bwd), device, iters)
            t_dense = timeit(step(lin, x, bwd), device, iters) if base_kind == "nf4" else t_base
            t_ours = timeit(step(layer, x, bwd), device, iters)
            t_peft = timeit(step(peft, x, bwd), device, iters)
        row[f"{tag}_ms"] = {"base": t_base * 1e3, "bf16_dense": t_dense * 1e3, "lorart": t_ours * 1e3,
                            "peft_style": t_peft * 1e3}
        row[f"{tag}_ratio_vs_base"] = t_ours / t_base
        row[f"{tag}_ratio_vs_peft"] = t_ours / t_peft
        row[f"{tag}_ratio_vs_bf16_dense"] = t_ours / t_dense
    with torch.enable_grad():
        row["peak_fwdbwd_bytes"] = {"lorart": peak_bytes(step(layer, x, True), device),
                                    "peft_style": peak_bytes(step(peft, x, True), device),
                                    "base": peak_bytes(step(base, x, True), device)}
    return row


def bench_mixed(K, N, rows, n_adapters, r, device, iters):
    dt = torch.bfloat16
    lin = nn.Linear(K, N, bias=False, device=device, dtype=dt)
    layer = LoRALinear(lin, r=r, alpha=2 * r).eval()
    for i in range(1, n_adapters):
        layer.add_adapter(f"a{i}", r=r, alpha=2 * r)
    with torch.no_grad():
        for n in layer.adapter_names:
            layer.lora_B[n].weight.normal_(0, 0.01)
    layer.set_adapter("default")
    x = torch.randn(rows, K, device=device, dtype=dt)
    ids = torch.arange(rows, device=device) % n_adapters
    with torch.no_grad():
        t_single = timeit(lambda: layer(x), device, iters)
        layer.adapter_ids = ids
        layer(x)  # build the stacked weights once (cached while the adapters are unchanged)
        t_mixed = timeit(lambda: layer(x), device, iters)
        layer.adapter_ids = None
        t_base = timeit(lambda: lin(x), device, iters)
    return {"K": K, "N": N, "rows": rows, "adapters": n_adapters, "r": r, "single_ms": t_single * 1e3,
            "mixed_ms": t_mixed * 1e3, "base_ms": t_base * 1e3, "mixed_ratio_vs_single": t_mixed / t_single}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (CPU smoke run)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dropout", type=float, default=0.05)
    args = ap.parse_args(argv)
    dev = args.device
    shapes = QUICK if args.quick else LLAMA
    Ms = [1, 256] if args.quick else [1, 4096]
    ranks = [8, 16] if args.quick else [8, 16, 64]
    iters = 5 if args.quick else 30
    results = {"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
               "torch": torch.__version__, "dropout": args.dropout, "linear": [], "mixed": []}
    print(f"{'K':>5} {'N':>6} {'M':>5} {'r':>3} {'base':>5} | fwd+bwd ms: base  lorart  peft | "
          f"x base  x peft  x bf16 | fwd x base  x peft | peak MiB ours/peft")
    for K, N in shapes:
        for M in Ms:
            for base_kind in ("bf16", "nf4"):
                for r in ranks:
                    row = bench_linear(K, N, M, r, base_kind, dev, iters, args.dropout)
                    results["linear"].append(row)
                    t = row["fwdbwd_ms"]
                    pk = row["peak_fwdbwd_bytes"]
                    mem = (f"{pk['lorart'] / 2**20:.1f}/{pk['peft_style'] / 2**20:.1f}" if pk["lorart"] is not None
                           else "-")
                    print(f"{K:>5} {N:>6} {M:>5} {r:>3} {base_kind:>5} | {t['base']:8.3f} {t['lorart']:7.3f} "
                          f"{t['peft_style']:7.3f} | {row['fwdbwd_ratio_vs_base']:6.3f} "
                          f"{row['fwdbwd_ratio_vs_peft']:6.3f} {row['fwdbwd_ratio_vs_bf16_dense']:6.3f} | "
                          f"{row['fwd_ratio_vs_base']:6.3f} {row['fwd_ratio_vs_peft']:6.3f} | {mem}", flush=True)
    K, N = shapes[0]
    for rows, na in ((32, 32),) if not args.quick else ((8, 8),):
        m = bench_mixed(K, N, rows, na, 16, dev, iters)
        results["mixed"].append(m)
        print(f"mixed batch {rows} rows x {na} adapters (r=16, {K}x{N}): {m['mixed_ms']:.3f} ms vs single-adapter "
              f"{m['single_ms']:.3f} ms (x{m['mixed_ratio_vs_single']:.3f}); bare base {m['base_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
