"""Time per step: the step's matmul FLOPs over the GEMM rate measured on the current device.

FLOPs (2 per multiply-add) of one optimizer step of `batch_size x max_seq_len` tokens x grad_accum:
  forward   every linear (2 * in * out per token; LoRA adds 2 * r * (in + out)), attention (QK^T and PV over
            the causal half of the keys, plus prefix keys), the LM head (2 * hidden * vocab per token)
  backward  dX of every linear a gradient flows through (= its forward), dW of trainable weights (= its
            forward), attention x 2, the loss's dh (and dW when the head trains), computed in its forward
  recompute gradient checkpointing runs each decoder layer's forward again
The rate is the median of a few timed [tokens, hidden] x [hidden, intermediate] matmuls in the run's compute
dtype, so the estimate is GEMM-bound, meant as a lower bound: elementwise kernels, attention kernels, NF4
dequantization and the optimizer add to it (docs/plan.md compares it with measured steps: under load the timing of
the rate itself varies up to 3x).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

_rates: dict = {}


def step_flops(setup) -> dict:
    from ..nn.lora import LoRALinear
    o = setup.opts
    t = o.train
    model = setup.model
    cfg = model.config
    prompt = getattr(model, "prompt_encoder", None)
    prefix = getattr(model, "prefix_encoder", None)
    Tx = t.max_seq_len + (prompt.embedding.weight.shape[0] if prompt is not None else 0)
    P = prefix.embedding.weight.shape[0] if prefix is not None else 0
    N = t.batch_size * Tx
    layer_fwd = bwd = 0.0
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        mods = [at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        mods += [m for sub in (at, mlp) if hasattr(sub, "adapter") for m in (sub.adapter.down, sub.adapter.up)]
        for m in mods:
            f = 2.0 * m.in_features * m.out_features
            if isinstance(m, LoRALinear):
                lora = 2.0 * m.r[m.active_adapter] * (m.in_features + m.out_features)
                layer_fwd += N * (f + lora)
                bwd += N * (f + 2 * lora)              # dX through W and the adapter; dA and dB
            else:
                trains = isinstance(m, nn.Linear) and m.weight.requires_grad
                layer_fwd += N * f
                bwd += N * f * (2 if trains else 1)     # dX (+ dW)
        att = N * 2 * 2.0 * cfg.num_attention_heads * cfg.head_dim * (Tx / 2 + P)   # QK^T and PV, causal
        layer_fwd += att
        bwd += 2 * att
    fwd = layer_fwd
    V, d = model.lm_head.weight.shape
    head = 2.0 * (N - t.batch_size) * d * V
    fwd += head * (2 + (1 if model.lm_head.weight.requires_grad else 0))   # logits, dh (and dW) in forward
    recompute = layer_fwd if t.gradient_checkpointing else 0.0
    total = (fwd + bwd + recompute) * t.grad_accum
    return {"forward": fwd * t.grad_accum, "backward": bwd * t.grad_accum,
            "recompute": recompute * t.grad_accum, "total": total}


def gemm_rate(device: str, dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 0.3) -> float:
    """Measured FLOP/s of a [m, k] x [k, n] matmul on `device` in `dtype` (median of timed rounds; cached)."""
    key = (device, dtype, m, k, n)
    if key in _rates:
        return _rates[key]
    dev = torch.device(device)
    a = torch.randn(m, k, device=dev).to(dtype)
    b = torch.randn(k, n, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    t0 = time.perf_counter()
    torch.mm(a, b)
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(50, int(seconds / 5 / one)))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        times.append((time.perf_counter() - t0) / reps)
    rate = 2.0 * m * k * n / statistics.median(times)
    _rates[key] = rate
    return rate


def estimate(setup) -> dict:
    """{"flops": ..., "gemm_tflops": measured or given, "step_s": ..., "source": ...}"""
    o = setup.opts
    fl = step_flops(setup)
    cfg = setup.config
    out = {"flops": fl, "gemm_tflops": None, "step_s": None, "source": None}
    if o.gemm_tflops:
        out["gemm_tflops"], out["source"] = o.gemm_tflops, "given (gemm_tflops)"
    elif o.device == "cpu" or torch.cuda.is_available():
        m = min(o.train.batch_size * o.train.max_seq_len, 2048)
        dt = o.dtype if o.autocast else setup.model.get_input_embeddings().weight.dtype   # compute dtype
        rate = gemm_rate(o.device, dt, m, cfg.hidden_size, cfg.intermediate_size)
        name = torch.cuda.get_device_name() if o.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        out["gemm_tflops"], out["source"] = rate / 1e12, f"measured here ({name}, {str(dt)[6:]} {m}x" \
                                                         f"{cfg.hidden_size}x{cfg.intermediate_size})"
    else:
        out["source"] = "no CUDA device here: pass gemm_tflops= (e.g. --gemm-tflops 700 for an H100 in bf16)"
    if out["gemm_tflops"]:
        out["step_s"] = fl["total"] / (out["gemm_tflops"] * 1e12)
    return out
