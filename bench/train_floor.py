"""The compute floor of one LoRA training step on this machine: the FLOPs a step cannot avoid (forward and
input-gradient backward of every frozen linear incl. the LM head, attention, the LoRA factors) counted from the
model's config, and the rate torch's GEMM reaches at the step's own shapes, so that a s/step can be read as a
fraction of what the CPU can do.

    python bench/train_floor.py [--threads 2] [--batch 8] [--seq 128] [--r 16] [--dtype float32] [--tiny]

The model is SmolLM2-135M's config (converted and cached on first use); --tiny takes bench/train.py's tiny random
Llama shapes instead (2 layers: a smoke run in seconds, tests/test_bench_train.py).

Each GEMM shape of the step (forward y = x W^T [M, K] x [K, N], input gradient dx = dy W [M, N] x [N, K]) is timed
with torch.mm (best of --reps after a warm-up); the floor is the sum over the step of FLOPs / that shape's rate,
plus attention (timed as SDPA forward + backward, causal) and the LoRA factors at their own (small-GEMM) rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def best(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tiny", action="store_true", help="bench/train.py's tiny Llama shapes (a smoke run)")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import torch
    import torch.nn.functional as F

    from lorart.models import LlamaConfig
    import train as tb
    from _timing import machine_load

    torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    if args.tiny:
        cfg = LlamaConfig.from_hf_dict(dict(tb.LLAMA7B, num_hidden_layers=2, **tb.TINY))
    else:
        cfg = LlamaConfig.from_json_file(os.path.join(tb.default_folder(), "config.json"))
    h, i, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    B, T, r = args.batch, args.seq, args.r
    M = B * T
    # (name, K=in, N=out, rows, count per step): every frozen linear of the step
    linears = [("q_proj", h, nh * hd, M, L), ("k_proj", h, nkv * hd, M, L), ("v_proj", h, nkv * hd, M, L),
               ("o_proj", nh * hd, h, M, L), ("gate/up_proj", h, i, M, 2 * L), ("down_proj", i, h, M, L),
               ("lm_head", h, v, B * (T - 1), 1)]
    g = torch.Generator().manual_seed(0)
    rate = {}
    rows = []
    total_fl = total_t = 0.0
    print(f"# {args.dtype} GEMM floor, {args.threads} thread(s), batch {B} x {T}, r {r}; {machine_load()}")
    print(f"{'GEMM':<24} {'M x K x N':>20} {'GFLOP/s fwd':>12} {'GFLOP/s dx':>11} {'GFLOP/step':>11} {'s/step':>7}")
    for name, K, N, m, n in linears:
        x = torch.randn(m, K, generator=g).to(dt)
        W = torch.randn(N, K, generator=g).to(dt)
        dy = torch.randn(m, N, generator=g).to(dt)
        tf = best(lambda: torch.mm(x, W.t()), args.reps)
        tb_ = best(lambda: torch.mm(dy, W), args.reps)
        fl = 2.0 * m * K * N
        rate[name] = (fl / tf, fl / tb_)
        t = n * (tf + tb_)
        total_fl += n * 2 * fl
        total_t += t
        rows.append((name, f"{m}x{K}x{N}", fl / tf / 1e9, fl / tb_ / 1e9, n * 2 * fl / 1e9, t))
    for row in rows:
        print(f"{row[0]:<24} {row[1]:>20} {row[2]:12.1f} {row[3]:11.1f} {row[4]:11.1f} {row[5]:7.3f}")
    # attention: SDPA causal forward + backward at the step's shape (what the step calls)
    q = torch.randn(B, nh, T, hd, generator=g).to(dt).requires_grad_()
    k = torch.randn(B, nkv, T, hd, generator=g).to(dt).requires_grad_()
    vv = torch.randn(B, nkv, T, hd, generator=g).to(dt).requires_grad_()
    go = torch.randn(B, nh, T, hd, generator=g).to(dt)

    def attn():
        o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, enable_gqa=nkv != nh)
        o.backward(go)

    ta = best(attn, args.reps) * L
    # QK^T and PV forward (4 B nh T^2 hd), backward dQ dK dV dP (8): 12 B nh T^2 hd, half of it under the causal mask
    attn_fl = L * 12 * B * nh * T * T * hd / 2
    # LoRA on q/k/v/o: shrink + expand forward, dB, d(xa), dA, dx backward: 6 small GEMMs of M x r x (K or N)
    lora_fl = L * 6 * M * r * (h + nh * hd + 2 * (h + nkv * hd) + nh * hd + h)
    xr = torch.randn(M, h, generator=g).to(dt)
    A = torch.randn(r, h, generator=g).to(dt)
    tl = best(lambda: torch.mm(xr, A.t()), args.reps)
    lora_rate = 2.0 * M * h * r / tl
    tlora = lora_fl / lora_rate
    print(f"{'attention (SDPA causal)':<24} {'':>20} {attn_fl / ta / 1e9:12.1f} {'(f+b)':>11} {attn_fl / 1e9:11.1f} "
          f"{ta:7.3f}")
    print(f"{'LoRA factors (r)':<24} {f'{M}x{h}x{r}':>20} {lora_rate / 1e9:12.1f} {'':>11} {lora_fl / 1e9:11.1f} "
          f"{tlora:7.3f}")
    fl = total_fl + attn_fl + lora_fl
    t = total_t + ta + tlora
    big = max(max(a, b) for a, b in rate.values())
    print(f"# frozen linears {total_fl / 1e9:.1f} GFLOP in {total_t:.3f} s ({total_fl / total_t / 1e9:.1f} GFLOP/s)")
    print(f"# step {fl / 1e9:.1f} GFLOP: {t:.2f} s at each part's measured rate; {fl / big:.2f} s at the best GEMM "
          f"rate ({big / 1e9:.1f} GFLOP/s), the floor no step of these FLOPs can beat on this machine")


if __name__ == "__main__":
    main()
