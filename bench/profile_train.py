"""Where the time of one training step goes: lorart's Llama + lorart.inject (LoRA, or QLoRA with --qlora) on the
converted SmolLM2-135M, the shape of bench/train.py (8 x 128, r 16 on q/k/v/o, AdamW), one step under
torch.profiler, the self time of every op on the main thread summed by category.

    python bench/profile_train.py [--qlora] [--threads 1] [--steps 2] [--top 20]

Categories come from op names and shapes (the rank r, the vocabulary and the MLP width tell the GEMMs apart).
On a busy machine use --threads 1: with 2 threads every parallel region waits for a descheduled thread and the
small ops' times are inflated at random; with one thread the shares are stable (the absolute times are not).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GEMMS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "aten::addmm_", "aten::baddbmm")
ELEMENTWISE = ("aten::cat", "aten::neg", "aten::mul", "aten::add", "aten::add_", "aten::slice", "aten::chunk",
               "aten::cos", "aten::sin", "aten::mul_", "aten::sub", "aten::fill_", "aten::zero_", "aten::zeros")
COPIES = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::reshape",
          "aten::view", "aten::transpose", "aten::t", "aten::as_strided", "aten::empty", "aten::empty_strided",
          "aten::empty_like", "aten::_unsafe_view", "aten::narrow", "aten::split", "aten::unsqueeze", "aten::select",
          "aten::expand", "aten::detach", "detach", "aten::resolve_conj", "aten::resolve_neg", "aten::permute")


def category(name: str, shapes, r: int, vocab: int, inter: int) -> str:
    if name.startswith(("_DenseFn", "_NF4Fn")):  # the LoRA ops' own time: lorart kernels, Python
        return "LoRA op self (dropout, NF4 decode, Python)"
    if "rms_norm" in name or "RMSNorm" in name or "rsqrt" in name:
        return "norms"
    if "swiglu" in name or "SwiGLU" in name or "silu" in name:
        return "activations (SwiGLU)"
    if "autograd::engine" in name or name.endswith(("Backward0", "Backward1", "Backward")):
        return "autograd nodes (self)"
    if "cross_entropy" in name.lower() or "CrossEntropy" in name or "softmax" in name or name in ("aten::gather", "aten::scatter_add_",
                                                                         "aten::exp_", "aten::exp"):
        return "lm_head + loss"
    if name in GEMMS:
        dims = set()
        for sh in shapes or ():
            if isinstance(sh, (list, tuple)):
                dims.update(d for d in sh if isinstance(d, int))
        if vocab in dims:
            return "lm_head + loss"
        if r in dims:
            return "LoRA GEMMs (r)"
        if inter in dims:
            return "MLP GEMMs"
        return "attention projection GEMMs"
    if "scaled_dot_product" in name or "flash_attention" in name or "_efficient_attention" in name:
        return "attention (sdpa)"
    if "dropout" in name:
        return "LoRA dropout"
    if "nf4" in name or "NF4" in name:
        return "NF4 dequantize"
    if "_foreach" in name or "adam" in name.lower() or name in ("aten::sqrt", "aten::addcdiv_", "aten::addcmul_",
                                                                  "aten::lerp_", "aten::div", "aten::div_"):
        return "optimizer"
    if "rope" in name.lower() or name in ELEMENTWISE:
        return "elementwise (RoPE, residual, casts)"
    if name in COPIES:
        return "copies / views / allocation"
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlora", action="store_true", help="NF4 q/k/v/o under the LoRA adapters")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="untimed steps before the timed and the profiled one")
    ap.add_argument("--top", type=int, default=15, help="also list the top ops by self time")
    ap.add_argument("--bf16", action="store_true", help="the step under torch.autocast('cpu', bfloat16)")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import torch

    import lorart
    import train as tb
    from lorart.models import load_hf_folder
    from lorart.nn import NF4Linear

    torch.set_num_threads(args.threads)
    lorart._C.set_num_threads(args.threads)
    factory = (lambda n, lin: NF4Linear.from_linear(lin)) if args.qlora else None
    model, _ = load_hf_folder(tb.default_folder(), dtype=torch.float32, linear_factory=factory)
    r = 16
    lorart.inject(model, targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=r, alpha=32, dropout=0.05)
    tb.same_lora_init(model, 0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.steps):
        step()
    t = time.perf_counter()
    step()
    plain = time.perf_counter() - t
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
    evs = prof.events()
    main_tid = collections.Counter(e.thread for e in evs).most_common(1)[0][0]
    tot, cnt, by, nby, other = (collections.Counter() for _ in range(5))
    cfg = model.config
    for e in evs:
        if e.thread != main_tid:
            continue
        c = category(e.name, e.input_shapes, r, cfg.vocab_size, cfg.intermediate_size)
        tot[c] += e.self_cpu_time_total
        cnt[c] += 1
        by[e.name] += e.self_cpu_time_total
        nby[e.name] += 1
        if c == "other":
            other[e.name] += e.self_cpu_time_total
    busy = sum(tot.values()) / 1e6
    from _timing import machine_load

    print(f"# one {'QLoRA' if args.qlora else 'LoRA'} step{' (bf16 autocast)' if args.bf16 else ''}, {args.threads} "
          f"thread(s): {plain:.3f} s unprofiled, {wall:.3f} s profiled; {machine_load()}")
    print(f"{'category':<38} {'s':>8} {'share':>6} {'calls':>6}")
    for c, v in tot.most_common():
        print(f"{c:<38} {v / 1e6:8.3f} {100 * v / 1e6 / wall:5.1f}% {cnt[c]:>6}")
    print(f"{'outside ops (Python, autograd engine)':<38} {wall - busy:8.3f} {100 * (wall - busy) / wall:5.1f}%")
    print("# other: " + ", ".join(f"{k} {v / 1e6:.3f} s" for k, v in other.most_common(6)))
    if args.top:
        print("# top ops by self time")
        for k, v in by.most_common(args.top):
            print(f"{k[:60]:<60} {v / 1e6:8.3f} s {nby[k]:>6}")


if __name__ == "__main__":
    main()
