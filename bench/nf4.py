"""NF4 benchmarks: quantize (with double quant), dequantize throughput and nf4_linear at M = 1, 16,
512 (and 4096 on CUDA) on Llama-7B shapes, against a pure-PyTorch reference and bitsandbytes (when
installed). One run, a table of ratios; on the CPU the contenders are timed round-robin (one call of
each per round) at --threads threads, and the machine load is printed with the table.

    python bench/nf4.py --device cuda [--json out.json]
    python bench/nf4.py --device cpu [--threads 2] [--quick]

Rows: `quantize` (lorart.nf4.quantize vs bnb quantize_4bit, NF4 + double quant); `dequantize` (the op,
which allocates its output: on the CPU fresh pages cost a page fault each, for bnb alike);
`dequant->buf` (CPU: into a reused buffer, as nf4_linear and training do; bnb has no CPU `out=`,
so its column is its allocating call); `nf4_linear` (GB/s of packed weight bytes; on the CPU also
the share of the measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from _timing import interleaved, machine_load, timeit

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


def time3(dev, iters, ours, ref, theirs) -> tuple[float, float, float]:
    """(ours, ref, bnb) seconds per call; CPU: round-robin; CUDA: each in turn (device-timed)."""
    nan = float("nan")
    if dev == "cpu":
        fns = {"ours": ours, **({"ref": ref} if ref else {}), **({"bnb": theirs} if theirs else {})}
        t = interleaved(fns, dev, iters)
        return t["ours"], t.get("ref", nan), t.get("bnb", nan)
    return (timeit(ours, dev, iters), timeit(ref, dev, iters) if ref else nan,
            timeit(theirs, dev, iters) if theirs else nan)


def copy_bandwidth(dev) -> float:
    """Bytes copied per second by a 256 MiB device-to-device copy (the machine's copy bandwidth)."""
    a = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return a.numel() / timeit(lambda: b.copy_(a), dev, 10)


def run(args) -> list[dict]:
    dev, dt = args.device, getattr(torch, args.dtype)
    shapes = QUICK if args.quick else LLAMA
    ms = [1, 16, 512] if args.quick or dev == "cpu" else [1, 16, 512, 4096]
    iters = args.iters or (5 if args.quick else 10 if dev == "cpu" else 50)
    copy_bw = copy_bandwidth(dev)
    rows = [{"op": "copy", "shape": [256 << 20], "m": None, "ours_s": (256 << 20) / copy_bw, "ref_s": float("nan"),
             "bnb_s": float("nan"), "GB/s": copy_bw / 1e9}]
    for (n, k) in shapes:
        w = (torch.randn(n, k, device=dev) * 0.02).to(dt)
        w4 = nf4.quantize(w, 64)
        bs = bnb_state(w, 64)
        packed_bytes = w4.nbytes
        out_bytes = n * k * torch.finfo(dt).bits // 8
        args_ = w4.op_args()

        t_ours, _, t_bnb = time3(dev, max(3, iters // 2), lambda: nf4.quantize(w, 64), None,
                                 (lambda: bnb_state(w, 64)) if bs else None)
        rows.append({"op": "quantize", "shape": [n, k], "m": None, "ours_s": t_ours, "ref_s": float("nan"),
                     "bnb_s": t_bnb, "GB/s": (out_bytes + packed_bytes) / t_ours / 1e9,
                     "Gelem/s": n * k / t_ours / 1e9})
        t_ours, t_ref, t_bnb = time3(dev, iters, lambda: torch.ops.lorart.nf4_dequantize(*args_, dt),
                                     lambda: torch_reference_dequantize(w4, dt),
                                     (lambda: bnbF.dequantize_4bit(bs[0], bs[1])) if bs else None)
        rows.append({"op": "dequantize", "shape": [n, k], "m": None, "ours_s": t_ours, "ref_s": t_ref,
                     "bnb_s": t_bnb, "GB/s": (packed_bytes + out_bytes) / t_ours / 1e9,
                     "Gelem/s": n * k / t_ours / 1e9})
        if dev == "cpu":
            out = torch.empty(n, k, dtype=dt)
            t_ours, _, t_bnb = time3(dev, iters, lambda: nf4_ops._dequantize_into(*args_, out), None,
                                     (lambda: bnbF.dequantize_4bit(bs[0], bs[1])) if bs else None)
            rows.append({"op": "dequant->buf", "shape": [n, k], "m": None, "ours_s": t_ours, "ref_s": float("nan"),
                         "bnb_s": t_bnb, "GB/s": (packed_bytes + out_bytes) / t_ours / 1e9,
                         "Gelem/s": n * k / t_ours / 1e9})
            del out
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            it = max(3, iters // (4 if m >= 512 else 1))
            t_ours, t_ref, t_bnb = time3(dev, it, lambda: torch.ops.lorart.nf4_linear(x, *args_, None),
                                         lambda: x @ torch_reference_dequantize(w4, dt).T,
                                         (lambda: bnb.matmul_4bit(x, bs[0].t(), quant_state=bs[1])) if bs else None)
            rows.append({"op": "nf4_linear", "shape": [n, k], "m": m, "ours_s": t_ours, "ref_s": t_ref,
                         "bnb_s": t_bnb, "GB/s": packed_bytes / t_ours / 1e9,
                         "TFLOP/s": 2 * m * n * k / t_ours / 1e12, "copy_share": packed_bytes / t_ours / copy_bw})
            if m <= 16:  # the other path at the same M, to tune GEMV_MAX_ROWS from one run
                lim = nf4_ops.GEMV_MAX_ROWS[dev]
                nf4_ops.GEMV_MAX_ROWS[dev] = (m - 1) if m <= lim else m
                t_alt = timeit(lambda: torch.ops.lorart.nf4_linear(x, *args_, None), dev, it)
                nf4_ops.GEMV_MAX_ROWS[dev] = lim
                rows[-1]["path"] = "gemv" if m <= lim else "dequant+matmul"
                rows[-1]["other_path_s"] = t_alt
    return rows


def print_table(rows, dev, load_before=""):
    where = torch.cuda.get_device_name() if dev == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# lorart NF4 bench on {dev}: {where}; bnb {'present' if bnb else 'absent'}; "
          f"{load_before} before, {machine_load()} after")
    print(f"{'op':<11} {'shape':>12} {'M':>5} {'ours us':>10} {'ref/ours':>9} {'bnb/ours':>9} {'GB/s':>8} {'extra':>14}")
    for r in rows:
        extra = (f"{r['TFLOP/s']:.2f} TFLOP/s" if r["op"] == "nf4_linear" else
                 f"{r['Gelem/s']:.2f} Gel/s" if "Gelem/s" in r else "")
        if dev == "cpu" and "copy_share" in r:
            extra += f" {100 * r['copy_share']:.0f}% copy"
        if "path" in r:
            extra += f"  {r['path']}; other path {r['other_path_s'] / r['ours_s']:.2f}x the time"
        print(f"{r['op']:<11} {'x'.join(map(str, r['shape'])):>12} {str(r['m'] or '-'):>5} {r['ours_s'] * 1e6:>10.1f} "
              f"{r['ref_s'] / r['ours_s']:>9.2f} {r['bnb_s'] / r['ours_s']:>9.2f} {r['GB/s']:>8.1f} {extra:>14}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (CPU smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and lorart (default 2)")
    ap.add_argument("--iters", type=int, default=0, help="timed rounds (default: 50 CUDA, 10 CPU, 5 --quick)")
    ap.add_argument("--json", help="write the results to this path")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        lorart._C.set_num_threads(args.threads)
    load_before = machine_load()
    rows = run(args)
    print_table(rows, args.device, load_before)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "lorart": lorart.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
