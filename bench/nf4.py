"""NF4 benchmarks: quantize (with double quant), dequantize throughput and nf4_linear at M = 1, 16,
512 (and 4096 on CUDA) on Llama-7B shapes, against a pure-PyTorch reference and bitsandbytes (when
installed). One run, a table of ratios; on the CPU the contenders are timed round-robin (one call of
each per round, bench/_timing.py) at --threads threads, the ratios are medians of per-round ratios, and the
machine load is printed with the table. On the CPU with bf16 the issue-13 goals are checked at the end.

    python bench/nf4.py --device cuda [--json out.json]
    python bench/nf4.py --device cpu [--threads 2] [--quick]

Rows: `quantize` (lorart.nf4.quantize vs bnb quantize_4bit, NF4 + double quant); `dequantize` (the op,
which allocates its output: on the CPU fresh pages cost a page fault each, for bnb alike);
`dequant->buf` (CPU: into a reused buffer, as nf4_linear and training do; bnb has no CPU `out=`,
so its column is its allocating call); `nf4_linear` (GB/s of packed weight bytes; on the CPU at M <= 16
also their share of the copy bandwidth: packed bytes read per second / bytes copied per second by a 256 MiB
copy timed in the same rounds). `bnb/ours` > 1: bitsandbytes takes that many times lorart's time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from _timing import interleaved_rounds, machine_load, round_ratio, timeit

import lorart
from lorart import nf4
from lorart.ops import nf4 as nf4_ops

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - optional peer
    bnb = bnbF = None

LLAMA = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK = [(1024, 1024), (2752, 1024)]
NAN = float("nan")


def torch_reference_dequantize(w4: nf4.NF4Weight, dtype) -> torch.Tensor:
    """Straightforward PyTorch decode (what a runtime without kernels does)."""
    code = nf4.nf4_code(w4.device)
    p = w4.packed.reshape(-1)
    q = torch.stack([p >> 4, p & 15], 1).reshape(-1)[: w4.numel].long()
    if w4.double_quant:
        b = torch.arange(w4.absmax.numel(), device=w4.device) // 256
        absmax = w4.nested_code[w4.absmax.long()] * w4.nested_absmax[b] + w4.offset
    else:
        absmax = w4.absmax
    return (code[q].view(-1, w4.blocksize) * absmax[:, None]).reshape(w4.shape).to(dtype)


def bnb_state(w: torch.Tensor, blocksize: int):
    if bnbF is None:
        return None
    try:
        return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    except Exception as e:  # noqa: BLE001
        print(f"# bitsandbytes unavailable on {w.device}: {e}", file=sys.stderr)
        return None


def contend(dev, iters, **fns) -> tuple[dict, dict]:
    """(median seconds per call, per-round seconds) of each given fn (None = absent). CPU: round-robin rounds
    (a busy machine drifts alike for all); CUDA: each in turn, device-timed (no per-round record)."""
    fns = {k: f for k, f in fns.items() if f is not None}
    if dev == "cpu":
        rounds = interleaved_rounds(fns, dev, iters)
        return {k: statistics.median(v) for k, v in rounds.items()}, rounds
    return {k: timeit(f, dev, iters) for k, f in fns.items()}, {}


def ratio(med: dict, rounds: dict, num: str, den: str) -> float:
    """num's time / den's time: the median of per-round ratios on the CPU, else of the medians."""
    if num not in med or den not in med:
        return NAN
    return round_ratio(rounds, num, den) if rounds else med[num] / med[den]


def copy_fn(dev):
    """A 256 MiB device-to-device copy (src + dst far above any cache): the machine's copy bandwidth."""
    a = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)  # fault the pages in
    return (lambda: b.copy_(a)), a.numel()


def row(op, shape, m, med, rounds, work_bytes, elems=None, **extra) -> dict:
    r = {"op": op, "shape": list(shape), "m": m, "ours_s": med["ours"], "ref_s": med.get("ref", NAN),
         "bnb_s": med.get("bnb", NAN), "ref_x": ratio(med, rounds, "ref", "ours"),
         "bnb_x": ratio(med, rounds, "bnb", "ours"), "GB/s": work_bytes / med["ours"] / 1e9, **extra}
    if elems:
        r["Gelem/s"] = elems / med["ours"] / 1e9
    return r


def run(args) -> list[dict]:
    dev, dt = args.device, getattr(torch, args.dtype)
    shapes = {"llama": LLAMA, "quick": QUICK, "4096": LLAMA[:1]}[args.shapes or ("quick" if args.quick else "llama")]
    ms = args.ms or ([1, 16, 512] if args.quick or dev == "cpu" else [1, 16, 512, 4096])
    iters = args.iters or (5 if args.quick else 10 if dev == "cpu" else 50)
    copy, copy_bytes = copy_fn(dev)
    med, rounds = contend(dev, iters, ours=copy)
    rows = [row("copy", [copy_bytes], None, med, rounds, copy_bytes)]
    for (n, k) in shapes:
        w = (torch.randn(n, k, device=dev) * 0.02).to(dt)
        w4 = nf4.quantize(w, 64)
        bs = bnb_state(w, 64)
        packed_bytes = w4.nbytes
        out_bytes = n * k * torch.finfo(dt).bits // 8
        med, rounds = contend(dev, max(3, iters // 2), ours=lambda: nf4.quantize(w, 64),
                              bnb=(lambda: bnb_state(w, 64)) if bs else None)
        rows.append(row("quantize", (n, k), None, med, rounds, out_bytes + packed_bytes, n * k))
        bnb_deq = (lambda: bnbF.dequantize_4bit(bs[0], bs[1])) if bs else None
        med, rounds = contend(dev, iters, ours=lambda: nf4_ops.nf4_dequantize(w4, dt),
                              ref=lambda: torch_reference_dequantize(w4, dt), bnb=bnb_deq)
        rows.append(row("dequantize", (n, k), None, med, rounds, packed_bytes + out_bytes, n * k))
        if dev == "cpu":
            out = torch.empty(n, k, dtype=dt)
            med, rounds = contend(dev, iters, ours=lambda: nf4_ops._dequantize_into(w4, out), bnb=bnb_deq)
            rows.append(row("dequant->buf", (n, k), None, med, rounds, packed_bytes + out_bytes, n * k))
            del out
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            it = max(3, iters // (4 if m >= 512 else 1))
            gemv = dev == "cpu" and m <= 16
            med, rounds = contend(dev, it, ours=lambda: nf4_ops.nf4_linear(x, w4, None),
                                  ref=lambda: x @ torch_reference_dequantize(w4, dt).T,
                                  bnb=(lambda: bnb.matmul_4bit(x, bs[0].t(), quant_state=bs[1])) if bs else None,
                                  copy=copy if gemv else None)
            r = row("nf4_linear", (n, k), m, med, rounds, packed_bytes, TFLOPs=2 * m * n * k / med["ours"] / 1e12)
            if gemv:  # packed bytes read per second / bytes copied per second, in the same rounds
                r["copy_share"] = statistics.median(packed_bytes / a / (copy_bytes / c)
                                                    for a, c in zip(rounds["ours"], rounds["copy"]))
            rows.append(r)
            if m <= 16:  # the other path at the same M, to tune GEMV_MAX_ROWS from one run
                lim = nf4_ops.GEMV_MAX_ROWS[dev]
                nf4_ops.GEMV_MAX_ROWS[dev] = (m - 1) if m <= lim else m
                t_alt = timeit(lambda: nf4_ops.nf4_linear(x, w4, None), dev, it)
                nf4_ops.GEMV_MAX_ROWS[dev] = lim
                r["path"] = "gemv" if m <= lim else "dequant+matmul"
                r["other_path_s"] = t_alt
    return rows


# the goals of issue 13 (CPU, bf16 output, NF4 + double quant)
GOALS = {"dequant_gelem": 5.0, "dequant_vs_bnb": 4.0, "quantize_vs_bnb": 10.0, "gemv_copy_share": 0.60}


def goal_lines(rows) -> list[str]:
    out = []
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if r["op"] in ("dequantize", "dequant->buf"):
            ok = r["Gelem/s"] >= GOALS["dequant_gelem"] and not r["bnb_x"] < GOALS["dequant_vs_bnb"]
            out.append(f"{r['op']} {shape}: {r['Gelem/s']:.2f} Gelem/s (goal >= {GOALS['dequant_gelem']:g}), "
                       f"{r['bnb_x']:.2f}x bnb (goal >= {GOALS['dequant_vs_bnb']:g}x): {'met' if ok else 'NOT met'}")
        elif r["op"] == "quantize":
            ok = r["bnb_x"] >= GOALS["quantize_vs_bnb"]
            out.append(f"quantize {shape}: {r['bnb_x']:.1f}x bnb (goal >= {GOALS['quantize_vs_bnb']:g}x): "
                       f"{'met' if ok else 'NOT met'}")
        elif "copy_share" in r:
            ok = r["copy_share"] >= GOALS["gemv_copy_share"]
            out.append(f"nf4_linear {shape} M={r['m']}: {100 * r['copy_share']:.0f}% of the copy bandwidth "
                       f"(goal >= {100 * GOALS['gemv_copy_share']:.0f}%): {'met' if ok else 'NOT met'}")
    return out


def print_table(rows, dev, dtype, load_before=""):
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"# lorart NF4 bench on {dev}: {where}; {dtype}; bnb {bnb.__version__ if bnb else 'absent'}; "
          f"{load_before} before, {machine_load()} after")
    print(f"{'op':<12} {'shape':>10} {'M':>4} {'ours us':>10} {'ref/ours':>9} {'bnb/ours':>9} {'GB/s':>7}  extra")
    for r in rows:
        extra = (f"{r['TFLOPs']:.3f} TFLOP/s" if r["op"] == "nf4_linear" else
                 f"{r['Gelem/s']:.2f} Gelem/s" if "Gelem/s" in r else "")
        if "copy_share" in r:
            extra += f", {100 * r['copy_share']:.0f}% of copy"
        if "path" in r:
            extra += f"; {r['path']}, the other path {r['other_path_s'] / r['ours_s']:.2f}x the time"
        print(f"{r['op']:<12} {'x'.join(map(str, r['shape'])):>10} {str(r['m'] or '-'):>4} {r['ours_s'] * 1e6:>10.1f} "
              f"{r['ref_x']:>9.2f} {r['bnb_x']:>9.2f} {r['GB/s']:>7.1f}  {extra}")
    if dev == "cpu" and dtype == "bfloat16":
        print("# goals (issue 13)")
        for ln in goal_lines(rows):
            print(ln)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (CPU smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and lorart (default 2)")
    ap.add_argument("--iters", type=int, default=0, help="timed rounds (default: 50 CUDA, 10 CPU, 5 --quick)")
    ap.add_argument("--ms", type=lambda v: [int(m) for m in v.split(",")], default=None,
                    help="nf4_linear row counts, e.g. 1,16 (default 1,16,512 on the CPU, 1,16,512,4096 on CUDA)")
    ap.add_argument("--shapes", choices=["llama", "quick", "4096"], default=None,
                    help="weight shapes (default: llama; quick with --quick; 4096: 4096x4096 only)")
    ap.add_argument("--json", help="write the results to this path")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        lorart._C.set_num_threads(args.threads)
    load_before = machine_load()
    rows = run(args)
    print_table(rows, args.device, args.dtype, load_before)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "lorart": lorart.__version__, "threads": args.threads,
                       "load": [load_before, machine_load()], "rows": rows, "goals": goal_lines(rows)}, f, indent=1)


if __name__ == "__main__":
    main()
