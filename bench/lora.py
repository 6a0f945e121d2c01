"""LoRA benchmarks: fwd and fwd+bwd of a LoRA linear against the bare base linear and a PEFT-style reference
(plain torch: base(x) + B(A(dropout(x))) * s), dense bf16 and NF4 bases, r = 8, 16, 64, Llama-7B shapes,
M = 1 and 4096; plus a mixed batch (32 rows, 32 adapters) against a single-adapter batch. One run, ratios,
peak memory. ``--host``: per-call host time at small shapes and op counts per fwd+bwd (host- vs kernel-bound).

    python bench/lora.py --device cuda [--json out.json]
    python bench/lora.py --device cpu --quick
    python bench/lora.py --host [--device cuda] [--threads 1] [--rows 1,64,384]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

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
    mods, dt = _layers(K, N, base_kind, r, p, device)  # base_kind "bf16" or "nf4": a bf16 computation
    layer, peft, base, lin = mods["lorart"], mods["peft"], mods["bare"], mods["dense"]
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


# ---- --host: per-call host time and op counts ----------------------------------------------------------------

HOST_SHAPES = [(16, 16), (576, 1536)]  # tiny (pure host time); SmolLM2-135M's MLP up-projection


def _layers(K, N, base_kind, r, p, device):
    """({lorart LoRALinear, PEFT-style module, bare base, the dense linear the base was made from}, dtype),
    all sharing one base and one A/B. base_kind: "fp32", "bf16" or "nf4" (bf16 compute)."""
    dt = torch.float32 if base_kind == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False, device=device, dtype=dt)
    lin.weight.requires_grad_(False)
    base = NF4Linear.from_linear(lin) if base_kind == "nf4" else lin
    layer = LoRALinear(base, r=r, alpha=2 * r, dropout=p).train()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.01)
    peft = PeftStyle(base, layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"], p).train()
    return {"lorart": layer, "peft": peft, "bare": base, "dense": lin}, dt


def _host_step(mod, x, gy, bwd):
    params = [q for q in mod.parameters() if q.requires_grad] + [x]
    if not bwd:
        def fwd():
            with torch.no_grad():
                mod(x)
        return fwd

    def fwdbwd():
        mod(x).backward(gy)
        for q in params:
            q.grad = None
    return fwdbwd


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def host_times(K, N, M, base_kind, r, p, device, rounds, calls, round_s=0.03):
    """Median per-call seconds of each variant and median per-round ratio lorart/peft, the variants interleaved
    round by round (a shared machine drifts). On the CPU: the calling thread's CPU time (one torch thread runs
    everything on it, and time spent descheduled on a busy machine is not counted). On a GPU: wall time with
    calls queued without a sync between them, so host time only while the GPU keeps up."""
    clock = time.thread_time if device == "cpu" else time.perf_counter
    mods, dt = _layers(K, N, base_kind, r, p, device)
    x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
    gy = torch.randn(M, N, device=device, dtype=dt)
    out = {}
    for tag, bwd in (("fwd", False), ("fwdbwd", True)):
        fns = {k: _host_step(mods[k], x, gy, bwd) for k in ("lorart", "peft", "bare")}
        per = {k: [] for k in fns}
        for f in fns.values():
            for _ in range(3):
                f()
        _sync(device)
        t = clock()
        fns["lorart"]()
        _sync(device)
        n = max(3, min(calls, int(round_s / max(clock() - t, 1e-7))))  # at most ~round_s per variant and round
        for _ in range(rounds):
            for k, f in fns.items():
                _sync(device)
                t = clock()
                for _ in range(n):
                    f()
                _sync(device)
                per[k].append((clock() - t) / n)
        out[tag] = {k: statistics.median(v) for k, v in per.items()}
        out[tag]["ratio_vs_peft"] = statistics.median(a / b for a, b in zip(per["lorart"], per["peft"]))
        out[tag]["ratio_vs_bare"] = statistics.median(a / b for a, b in zip(per["lorart"], per["bare"]))
    return out


class _CountC:
    """Stands in for lorart._C while counting: calls into lorart's C++ kernels are not aten ops."""

    def __init__(self, real, counts):
        self._real, self._counts = real, counts

    def __getattr__(self, name):
        f = getattr(self._real, name)

        def call(*a, **k):
            self._counts["lorart_C"] += 1
            return f(*a, **k)
        return call


def op_counts(K, N, M, base_kind, r, p, device):
    """Per fwd+bwd: aten ops, calls into lorart's C++ kernels, and new allocations of at least M * min(K, N)
    elements (activation-sized: x-, y-, dx-shaped), for lorart and the PEFT-style module."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lorart.ops import lora as lops
    from lorart.ops import nf4 as nops

    class Count(TorchDispatchMode):
        def __init__(self, counts):
            super().__init__()
            self.c = counts

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.c["aten"] += 1
            ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.numel() >= M * min(K, N)
                        and t.untyped_storage().data_ptr() not in ins):
                    self.c["big_allocs"] += 1
            return out

    mods, dt = _layers(K, N, base_kind, r, p, device)
    x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
    gy = torch.randn(M, N, device=device, dtype=dt)
    res = {}
    for k in ("lorart", "peft"):
        step = _host_step(mods[k], x, gy, True)
        step()
        c = {"aten": 0, "lorart_C": 0, "big_allocs": 0}
        saved = lops._C, nops._C
        lops._C = nops._C = _CountC(saved[0], c)
        try:
            with Count(c):
                step()
        finally:
            lops._C, nops._C = saved
        res[k] = c
    return res


def main_host(args) -> int:
    dev = args.device
    torch.set_num_threads(args.threads)
    rounds, calls = (5, 50) if args.quick else (args.rounds, 200)
    res = {"device": dev, "threads": args.threads, "torch": torch.__version__, "r": 16, "host": [], "ops": []}
    clock = "thread CPU time" if dev == "cpu" else "wall time"
    print(f"per-call {clock}, us (median of {rounds} interleaved rounds of up to {calls} calls or ~30 ms; ratios: "
          f"median per round), "
          f"r=16, {args.threads} thread(s), {dev}")
    print(f"{'K':>4} {'N':>5} {'M':>3} {'base':>4} {'p':>4} | fwd: lorart  peft  bare  x peft | "
          f"fwd+bwd: lorart  peft  bare  x peft")
    rows = [int(m) for m in args.rows.split(",")]
    for K, N in HOST_SHAPES:
        for M in (rows if (K, N) == HOST_SHAPES[-1] else [1]):
            for base_kind in ("fp32", "bf16", "nf4"):
                for p in (0.0, 0.05):
                    t = host_times(K, N, M, base_kind, 16, p, dev, rounds, calls)
                    res["host"].append({"K": K, "N": N, "M": M, "base": base_kind, "p": p, **t})
                    f, b = t["fwd"], t["fwdbwd"]
                    print(f"{K:>4} {N:>5} {M:>3} {base_kind:>4} {p:>4} | {f['lorart'] * 1e6:9.1f} "
                          f"{f['peft'] * 1e6:5.1f} {f['bare'] * 1e6:5.1f} {f['ratio_vs_peft']:6.2f} | "
                          f"{b['lorart'] * 1e6:12.1f} {b['peft'] * 1e6:5.1f} {b['bare'] * 1e6:5.1f} "
                          f"{b['ratio_vs_peft']:6.2f}", flush=True)
    K, N = HOST_SHAPES[-1]
    M = 64 if args.quick else 512
    print(f"ops per fwd+bwd, {K}x{N}, M={M}, r=16: aten ops / lorart C++ kernel calls / new tensors of >= "
          f"M*min(K,N) = {M * min(K, N)} elements")
    for base_kind in ("bf16", "nf4"):
        for p in (0.0, 0.05):
            c = op_counts(K, N, M, base_kind, 16, p, dev)
            res["ops"].append({"K": K, "N": N, "M": M, "base": base_kind, "p": p, **c})
            lo, pe = c["lorart"], c["peft"]
            print(f"  {base_kind:>4} p={p:<4}: lorart {lo['aten']:3d} / {lo['lorart_C']} / {lo['big_allocs']}   "
                  f"peft-style {pe['aten']:3d} / {pe['lorart_C']} / {pe['big_allocs']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (CPU smoke run)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--host", action="store_true", help="per-call host time at small shapes and op counts")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads in --host mode")
    ap.add_argument("--rows", default="1", help="--host: comma-separated M values for the 576x1536 shape")
    ap.add_argument("--rounds", type=int, default=15, help="--host: interleaved timing rounds")
    args = ap.parse_args(argv)
    if args.host:
        return main_host(args)
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
