"""Peak memory of one training step, by part, from the Setup (meta model) and the activation ledger.

Parts (bytes on the training device):
  base weights       frozen weights in the run's dtype (dense)
  NF4 base           packed 4-bit codes + block scales + double-quant state of every NF4 layer
  trainable weights  float32 master weights (BitFit's biases: their layer's dtype)
  gradients          one per trainable weight, same dtype
  optimizer states   AdamW exp_avg + exp_avg_sq: 8 B/param (32-bit) or 2 B/param + 2 float32 absmax per
                     256 elements (8-bit; tensors < 4096 elements stay 32-bit), as lorart.optim.PagedAdamW lays
                     them out; paged: only the double-buffered staging area stays on the GPU
  activations        what autograd keeps for backward (lorart.plan.ledger), or with gradient checkpointing each
                     layer's input plus one layer's recomputed activations
  chunked loss       dh (and dW of a trainable lm_head) held from forward to the end of backward, and one chunk's
                     float32 logits (float32 without autocast: the two buffers every chunk reuses; else + logsumexp's
                     temporary + the previous chunk still referenced)
  workspace          NF4 dequantization buffer (one layer, compute dtype), the largest short-lived tensors of
                     forward/backward, cuBLAS workspace on CUDA

The peak is the largest of three moments of a step: the end of forward (in the loss), the backward sweep
(activations freed layer by layer while gradients appear) and the optimizer step (all gradients alive).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import ledger as _ledger
from .spec import Setup

BLOCK8 = 256          # 8-bit AdamW: one float32 absmax per 256 elements (lorart.ops.optim.BLOCK)
MIN_8BIT = 4096       # PagedAdamW(min_8bit_size=4096): smaller tensors keep float32 states
CUBLAS_WORKSPACE = 32 << 20


def state_bytes(numels: list, bits: int) -> int:
    """Bytes of AdamW's two states for parameters of these sizes (PagedAdamW's layouts)."""
    total = 0
    for n in numels:
        if bits == 8 and n >= MIN_8BIT:
            total += 2 * n + 2 * 4 * -(-n // BLOCK8)
        else:
            total += 8 * n
    return total


def staging_bytes(numels: list, bits: int) -> int:
    """GPU bytes of PagedAdamW's double-buffered staging area when the states are paged (its default chunk:
    1/16 of the paged state, clamped to [4 MiB, 64 MiB] of one state)."""
    elem = 1 if bits == 8 else 4
    total = sum(numels) * elem
    if total == 0:
        return 0
    chunk = min(64 << 20, max(4 << 20, total // 16)) // elem
    per_elem = (1 + 4 / BLOCK8) if bits == 8 else 4
    return int(2 * 2 * chunk * per_elem)


@dataclass
class Memory:
    parts: dict                      # name -> bytes held at the peak (device)
    peak: int                        # predicted peak bytes on the device (sum of parts)
    phase: str                       # "forward" | "backward" | "optimizer": when the peak happens
    phases: dict                     # phase -> its total
    host: dict = field(default_factory=dict)   # bytes kept in host memory (paged optimizer states)
    notes: list = field(default_factory=list)
    per_layer_activations: int = 0
    fsdp: dict = field(default_factory=dict)


def estimate(setup: Setup) -> Memory:
    o = setup.opts
    t = o.train
    model = setup.model
    autocast = o.dtype if o.autocast else None
    led, layers, head = _ledger.forward(model, t.batch_size, t.max_seq_len, autocast, masked=t.packing)

    trainable = setup.trainable
    grads = sum(p.nbytes for p in trainable)
    numels = [p.numel for p in trainable]
    states = state_bytes(numels, o.optimizer_state_bits)
    host = {}
    state_name = "optimizer states"
    if o.paged and o.device == "cuda":
        host["optimizer states (paged to pinned host memory)"] = states
        states, state_name = staging_bytes(numels, o.optimizer_state_bits), "optimizer states (paged: GPU staging)"
    static = {"base weights": sum(p.nbytes for p in setup.frozen),
              "NF4 base (codes + scales)": sum(b.nbytes for b in setup.buffers),
              "trainable weights": grads, state_name: states}
    workspace = max((r * c for _, r, c in setup.nf4_linears), default=0) * o.dtype.itemsize
    workspace += CUBLAS_WORKSPACE if o.device == "cuda" else 0

    ckpt = t.gradient_checkpointing
    act = "activations (checkpointed)" if ckpt else "activations"
    saved = [lc.saved for lc in layers]
    kept = [lc.input for lc in layers] if ckpt else saved   # checkpointing keeps each layer's input only
    head_saved = led.bytes("head") + led.bytes("held")
    accum = grads if t.grad_accum > 1 else 0                # later micro-batches run with the gradients alive
    L = len(layers)
    moments = []
    # end of forward, in the loss: everything kept, the normed hidden states and their shifted copy, the loss's
    # held dh/dW and one chunk of logits
    # autocast caches its compute-dtype copy of every trainable weight until forward ends: those not saved for
    # backward (all of them under checkpointing) are extra during forward
    casts = [w for w in led.weight_casts.values() if ckpt or id(w) not in led.saved]
    cast_extra = sum(w.nbytes for w in casts)
    moments.append(("forward", {act: sum(kept) + head_saved + cast_extra, "gradients": accum,
                                "chunked loss": head["held"] + head["hn"] + head["h_copy"] + head["chunk_transient"],
                                "workspace": workspace}))
    # inside the last layer's forward (its short-lived tensors; with checkpointing its activations are transient)
    if L:
        moments.append(("forward", {act: sum(kept) + head_saved - head["final_norm"] + (saved[-1] if ckpt else 0)
                                    + cast_extra,
                                    "gradients": accum, "chunked loss": 0,
                                    "workspace": workspace + layers[-1].fwd_transient}))
    # backward, last layer first, at each layer's SwiGLU backward: layers < k hold their activations (with
    # checkpointing: their inputs) and layer k its own (recomputed) minus the down projection's input; the final
    # norm's saved input is gone; gradients of the head, of layers > k and of layer k's down projection exist
    done = accum or grads - sum(lc.grads for lc in layers)
    for k in range(L - 1, -1, -1):
        lc = layers[k]
        acts = sum(kept[:k]) + (lc.input if ckpt else 0) + saved[k] - lc.freed_before_peak
        moments.append(("backward", {act: acts + head_saved - head["final_norm"],
                                     "gradients": accum or done + lc.grads_before_peak,
                                     "chunked loss": head["held"], "workspace": workspace + lc.bwd_transient}))
        done = accum or done + lc.grads
    emb = model.get_input_embeddings().weight
    tied = model.lm_head.weight is emb
    dense = emb.numel() * emb.element_size() if (emb.requires_grad and tied) else 0   # embedding's dense grad
    moments.append(("backward", {act: 0, "gradients": grads, "chunked loss": head["held"],
                                 "workspace": workspace + dense}))
    moments.append(("optimizer", {act: 0, "gradients": grads, "chunked loss": 0, "workspace": workspace}))
    base = sum(static.values())
    phases = {}
    for ph, m in moments:
        phases[ph] = max(phases.get(ph, 0), base + sum(m.values()))
    phase, dyn = max(moments, key=lambda pm: sum(pm[1].values()))
    parts = {**static, **dyn}
    mem = Memory(parts=parts, peak=sum(parts.values()), phase=phase, phases=phases, host=host,
                 per_layer_activations=max(saved, default=0))
    if o.fsdp > 1:
        mem.fsdp = _fsdp(setup, mem, static, o.fsdp)
    return mem


def _fsdp(setup: Setup, mem: Memory, static: dict, n: int) -> dict:
    """What sharding N ways (ZeRO-3 / FSDP2 full sharding, as `lorart train --fsdp`) would give per
    rank: the textbook arithmetic, labelled as such (not checked against a measured multi-process run)."""
    sharded = sum(static.values()) + mem.parts.get("gradients", 0)
    gather = max((sum(p.numel() * p.element_size() for p in lay.parameters()) for lay in setup.model.model.layers),
                 default=0)
    per_gpu = sharded // n + 2 * gather + (mem.peak - sharded)
    return {"gpus": n, "per_gpu_peak": per_gpu, "sharded_state": sharded // n, "gather_buffers": 2 * gather,
            "note": "textbook arithmetic for FSDP2 full sharding (`lorart train --fsdp` under torchrun): sharded "
                    "state / N + two decoder layers' gathered weights + activations; not checked against a "
                    "measured multi-process run"}
