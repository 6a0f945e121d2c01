"""The fused training ops against the plain PyTorch they replace, as ratios from one run, plus peak memory on CUDA:
swiglu (lorart.ops.act) vs F.silu(g) * u, rms_norm (lorart.ops.norm) vs LlamaRMSNorm's ops, and the chunked
linear + cross-entropy (lorart.ops.loss) vs lm_head + F.cross_entropy. Forward+backward, Llama-7B-like shapes
on CUDA (SmolLM2-135M-like on the CPU).

    python bench/fused.py --device cuda [--json out.json]
    python bench/fused.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from _timing import timeit

from lorart.ops.act import swiglu
from lorart.ops.loss import linear_cross_entropy
from lorart.ops.norm import rms_norm


def plain_rms_norm(x, w, eps=1e-6):
    dtype = x.dtype
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def plain_loss(h, W, y):
    return F.cross_entropy(F.linear(h, W).float(), y, reduction="sum")


def peak(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd(f, inputs):
    def run():
        out = f(*inputs)
        grads = torch.autograd.grad(out.float().sum() if out.dim() else out, [t for t in inputs if t.requires_grad])
        del out, grads
    return run


def case(name, ours, plain, inputs, device, iters):
    t_ours = timeit(fwd_bwd(ours, inputs), device, iters)
    t_plain = timeit(fwd_bwd(plain, inputs), device, iters)
    row = {"case": name, "lorart_ms": t_ours * 1e3, "plain_ms": t_plain * 1e3, "ratio": t_ours / t_plain,
           "peak_mib": {"lorart": peak(fwd_bwd(ours, inputs), device), "plain": peak(fwd_bwd(plain, inputs), device)}}
    pk = row["peak_mib"]
    mem = f"{pk['lorart']:.0f}/{pk['plain']:.0f} MiB" if pk["lorart"] is not None else "-"
    print(f"{name:<44} fwd+bwd {row['lorart_ms']:8.3f} ms vs {row['plain_ms']:8.3f} ms  x{row['ratio']:.3f}  "
          f"peak ours/plain {mem}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = args.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cuda" and not args.quick:
        tokens, hidden, inter, vocab = 8192, 4096, 11008, 128256
    elif dev == "cuda":
        tokens, hidden, inter, vocab = 2048, 4096, 11008, 32000
    else:
        tokens, hidden, inter, vocab = (512 if args.quick else 2048), 576, 1536, 49152
    iters = 5 if args.quick else 20
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s, grad=True, scale=1.0):
        return (torch.randn(*s, generator=g, device=dev) * scale).to(dt).requires_grad_(grad)

    rows = []
    gate, up = rnd(tokens, inter, scale=3.0), rnd(tokens, inter)
    rows.append(case(f"swiglu {tokens}x{inter} {str(dt)[6:]}", swiglu, lambda a, b: F.silu(a) * b, (gate, up), dev,
                     iters))
    del gate, up
    x, w = rnd(tokens, hidden), (torch.rand(hidden, generator=g, device=dev) + 0.5).to(dt).requires_grad_()
    rows.append(case(f"rms_norm {tokens}x{hidden} {str(dt)[6:]}", rms_norm, plain_rms_norm, (x, w), dev, iters))
    del x, w
    h, W = rnd(tokens, hidden), rnd(vocab, hidden, grad=False, scale=0.02)
    y = torch.randint(0, vocab, (tokens,), generator=g, device=dev)
    rows.append(case(f"lm loss {tokens}x{hidden} vocab {vocab} {str(dt)[6:]}",
                     lambda a, b: linear_cross_entropy(a, b, y), lambda a, b: plain_loss(a, b, y), (h, W), dev,
                     max(3, iters // 4)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
                       "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
