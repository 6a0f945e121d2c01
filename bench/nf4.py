"""NF4 benchmarks: dequantize throughput and nf4_linear at M = 1, 16, 512, 4096 on Llama-7B shapes,
against a pure-PyTorch reference and bitsandbytes (when installed). One run, a table of ratios.

    python bench/nf4.py --device cuda [--json out.json]
    python bench/nf4.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from _timing import timeit

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


def run(args) -> list[dict]:
    dev, dt = args.device, getattr(torch, args.dtype)
    shapes = QUICK if args.quick else LLAMA
    ms = [1, 16, 512] if args.quick else [1, 16, 512, 4096]
    iters = 5 if args.quick else 50
    rows = []
    for (n, k) in shapes:
        w = (torch.randn(n, k, device=dev) * 0.02).to(dt)
        w4 = nf4.quantize(w, 64)
        bs = bnb_state(w, 64)
        packed_bytes = w4.nbytes
        out_bytes = n * k * torch.finfo(dt).bits // 8
        out = torch.empty(n, k, dtype=dt, device=dev)

        def ours():
            nf4_ops.nf4_dequantize(w4, dt)

        t_ours = timeit(ours, dev, iters)
        t_ref = timeit(lambda: torch_reference_dequantize(w4, dt), dev, iters)
        t_bnb = timeit(lambda: bnbF.dequantize_4bit(bs[0], bs[1]), dev, iters) if bs else float("nan")
        rows.append({"op": "dequantize", "shape": [n, k], "m": None, "ours_s": t_ours, "ref_s": t_ref,
                     "bnb_s": t_bnb, "GB/s": (packed_bytes + out_bytes) / t_ours / 1e9,
                     "Gelem/s": n * k / t_ours / 1e9})
        del out
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            it = max(3, iters // (4 if m >= 512 else 1))
            t_ours = timeit(lambda: nf4_ops.nf4_linear(x, w4, None), dev, it)
            t_ref = timeit(lambda: x @ torch_reference_dequantize(w4, dt).T, dev, it)
            t_bnb = (timeit(lambda: bnb.matmul_4bit(x, bs[0].t(), quant_state=bs[1]), dev, it)
                     if bs else float("nan"))
            rows.append({"op": "nf4_linear", "shape": [n, k], "m": m, "ours_s": t_ours, "ref_s": t_ref,
                         "bnb_s": t_bnb, "GB/s": packed_bytes / t_ours / 1e9,
                         "TFLOP/s": 2 * m * n * k / t_ours / 1e12})
            if m <= 16:  # the other path at the same M, to tune GEMV_MAX_ROWS from one run
                lim = nf4_ops.GEMV_MAX_ROWS[dev]
                nf4_ops.GEMV_MAX_ROWS[dev] = (m - 1) if m <= lim else m
                t_alt = timeit(lambda: nf4_ops.nf4_linear(x, w4, None), dev, it)
                nf4_ops.GEMV_MAX_ROWS[dev] = lim
                rows[-1]["path"] = "gemv" if m <= lim else "dequant+matmul"
                rows[-1]["other_path_s"] = t_alt
    return rows


def print_table(rows, dev):
    print(f"# lorart NF4 bench on {dev}: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; "
          f"bnb {'present' if bnb else 'absent'}")
    print(f"{'op':<11} {'shape':>12} {'M':>5} {'ours us':>10} {'ref/ours':>9} {'bnb/ours':>9} {'GB/s':>8} {'extra':>14}")
    for r in rows:
        extra = f"{r['Gelem/s']:.2f} Gel/s" if r["op"] == "dequantize" else f"{r['TFLOP/s']:.2f} TFLOP/s"
        if "path" in r:
            extra += f"  {r['path']}; other path {r['other_path_s'] / r['ours_s']:.2f}x the time"
        print(f"{r['op']:<11} {'x'.join(map(str, r['shape'])):>12} {str(r['m'] or '-'):>5} {r['ours_s'] * 1e6:>10.1f} "
              f"{r['ref_s'] / r['ours_s']:>9.2f} {r['bnb_s'] / r['ours_s']:>9.2f} {r['GB/s']:>8.1f} {extra:>14}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (CPU smoke run)")
    ap.add_argument("--json", help="write the results to this path")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = run(args)
    print_table(rows, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "lorart": lorart.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
