"""The activation ledger: which tensors one training forward of lorart's Llama keeps for backward, by name.

A symbolic replay of `lorart.models.llama` (decoder layer, attention, MLP, the chunked loss) and of the method
modules attached to it (LoRALinear, NF4Linear, bottleneck adapters, prefix and prompt tuning). Tensors are
sizes and dtypes only; each op applies the rule autograd applies to the real op:

- nn.Linear saves its input only when its weight trains (dX needs W alone); a LoRA op always saves its input
  and the small xa = x @ A.T; rms_norm saves its input and the per-row rstd (float32); SwiGLU saves gate and
  up; scaled_dot_product_attention (flash / efficient kernels) saves q, k, v, its output and the float32
  log-sum-exp, and a boolean mask converted to q's dtype; RoPE, views and additions save nothing new.
- An op saves only when a gradient flows through it, so the first layer saves less when nothing before it
  trains (LoRA, adapters, BitFit) and everything when the embeddings or a soft prompt train.
- Under autocast (lorart.train on CUDA in bf16/fp16) linear and attention inputs are cast to the compute dtype
  (a new tensor per call for activations, one cached copy per trainable weight: those copies are saved too).

Tests compare the ledger with the bytes that torch's saved-tensor hooks see on real models, for every method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

F32, I64 = torch.float32, torch.int64


class Sym:
    """A symbolic tensor: elements, dtype, and whether a gradient flows through it."""
    __slots__ = ("name", "numel", "dtype", "grad", "param")

    def __init__(self, name: str, numel: int, dtype: torch.dtype, grad: bool = False, param: bool = False):
        self.name, self.numel, self.dtype, self.grad = name, int(numel), dtype, bool(grad)
        self.param = param   # a parameter used as an input: its memory is the weight's, not an activation's

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Ledger:
    """Tensors saved for backward (deduplicated by identity), grouped by where they sit."""
    autocast: Optional[torch.dtype]
    saved: dict = field(default_factory=dict)        # id -> (Sym, group)
    weight_casts: dict = field(default_factory=dict)  # autocast's cached weight copies: param id -> Sym

    def save(self, t: Sym, group: str) -> None:
        if isinstance(t, Sym) and not t.param:
            self.saved.setdefault(id(t), (t, group))

    def bytes(self, group: Optional[str] = None) -> int:
        return sum(t.nbytes for t, g in self.saved.values() if group is None or g == group)

    def items(self, group: str) -> list:
        return [t for t, g in self.saved.values() if g == group]

    # ---- ops ---------------------------------------------------------------------------------------------
    def cast(self, x: Sym, dtype: torch.dtype) -> Sym:
        return x if x.dtype == dtype else Sym(x.name + "_" + str(dtype)[6:], x.numel, dtype, x.grad)

    def linear(self, x: Sym, w: nn.Linear, group: str, name: str) -> Sym:
        """nn.Linear (F.linear), with autocast's casts."""
        W, b = w.weight, w.bias
        trains = W.requires_grad
        if self.autocast is not None:
            x = self.cast(x, self.autocast)
            if W.dtype != self.autocast and (x.grad or trains):   # the cached bf16 copy of the weight
                wc = self.weight_casts.setdefault(id(W), Sym(name + ".weight_cast", W.numel(), self.autocast))
                if x.grad:
                    self.save(wc, group)
            out_dtype = self.autocast
        else:
            out_dtype = W.dtype
        if trains:
            self.save(x, group)
        grad = x.grad or trains or (b is not None and b.requires_grad)
        return Sym(name, x.numel // w.in_features * w.out_features, out_dtype, grad)

    def lora(self, x: Sym, m, group: str, name: str) -> Sym:
        """LoRALinear.forward's per-call path: x and A, B cast to the base's dtype; the op saves x, A, B, xa."""
        from ..nn.lora import nf4_weight_of
        base = m.base_layer
        name_ = m.active_adapter
        A, B = m.lora_A[name_].weight, m.lora_B[name_].weight
        if nf4_weight_of(base) is not None:
            dt = x.dtype if x.dtype != torch.float64 else F32
        else:
            dt = base.weight.dtype
        x = self.cast(x, dt)
        rows = x.numel // m.in_features
        for p, tag in ((A, "A"), (B, "B")):
            if p.dtype != dt:
                self.save(Sym(f"{name}.lora_{tag}_cast", p.numel(), dt), group)
        self.save(x, group)
        self.save(Sym(name + ".xa", rows * A.shape[0], dt, True), group)
        return Sym(name, rows * m.out_features, dt, True)

    def nf4(self, x: Sym, m, name: str) -> Sym:
        """NF4Linear: frozen 4-bit weight; the op saves only the (persistent) NF4 buffers."""
        cdt = m.compute_dtype or m.weight.dtype
        xc = self.cast(x, cdt)
        y = Sym(name, xc.numel // m.in_features * m.out_features, cdt, xc.grad)
        return self.cast(y, x.dtype)

    def project(self, x: Sym, m: nn.Module, group: str, name: str) -> Sym:
        from ..nn.lora import LoRALinear
        from ..nn.nf4_linear import NF4Linear
        if isinstance(m, LoRALinear):
            return self.lora(x, m, group, name)
        if isinstance(m, NF4Linear):
            return self.nf4(x, m, name)
        if isinstance(m, nn.Linear):
            return self.linear(x, m, group, name)
        raise NotImplementedError(f"lorart.plan: no memory rule for a {type(m).__name__} at {name}")

    def rms_norm(self, x: Sym, w: torch.Tensor, group: str, name: str) -> Sym:
        if w.dtype != x.dtype:
            raise NotImplementedError(f"lorart.plan: {name}: RMSNorm with a {w.dtype} weight on {x.dtype} input "
                                      "takes the unfused path, which the plan does not model")
        grad = x.grad or w.requires_grad
        if grad:
            self.save(x, group)
            stat = torch.float64 if x.dtype == torch.float64 else F32
            self.save(Sym(name + ".rstd", x.numel // w.numel(), stat), group)
        return Sym(name, x.numel, x.dtype, grad)

    def sdpa(self, q: Sym, k: Sym, v: Sym, mask: Optional[Sym], B: int, heads: int, T: int, group: str) -> Sym:
        if self.autocast is not None:
            q, k, v = (self.cast(t, self.autocast) for t in (q, k, v))
        out = Sym("attn_out", q.numel, q.dtype, q.grad or k.grad or v.grad)
        if out.grad:
            for t in (q, k, v, out):
                self.save(t, group)
            self.save(Sym("lse", B * heads * T, F32), group)
            if mask is not None:   # a boolean mask is converted to an additive one in q's dtype, and saved
                self.save(Sym("mask", mask.numel, q.dtype), group)
        return out

    def swiglu(self, g: Sym, u: Sym, group: str) -> Sym:
        if g.dtype != u.dtype:
            raise NotImplementedError("lorart.plan: SwiGLU on mixed dtypes takes the unfused path (not modelled)")
        grad = g.grad or u.grad
        if grad:
            self.save(g, group)
            self.save(u, group)
        return Sym("swiglu", g.numel, g.dtype, grad)

    def adapter(self, h: Sym, ad, group: str, name: str) -> Sym:
        """BottleneckAdapter: h + scale * up(act(down(h.to(param dtype)))).to(h.dtype)."""
        x = self.cast(h, ad.down.weight.dtype)
        z = self.linear(x, ad.down, group, name + ".down")
        a = Sym(name + ".act", z.numel, z.dtype, z.grad)
        if a.grad:   # gelu / silu save their input, relu / tanh their output: one tensor of that size
            self.save(z if ad.activation in ("gelu", "silu", "swish") else a, group)
        y = self.linear(a, ad.up, group, name + ".up")
        y = Sym(name + ".scaled", y.numel, y.dtype, y.grad)
        y = self.cast(y, h.dtype)
        return self.add(h, y, name)

    @staticmethod
    def add(a: Sym, b: Sym, name: str) -> Sym:
        return Sym(name, max(a.numel, b.numel), torch.promote_types(a.dtype, b.dtype), a.grad or b.grad)


@dataclass
class LayerCost:
    saved: int            # bytes the layer keeps for backward (without checkpointing)
    input: int            # bytes of its input (what checkpointing keeps instead)
    fwd_transient: int    # largest short-lived tensors while it runs forward
    bwd_transient: int    # short-lived gradients at its backward's peak (the SwiGLU backward)
    grads: int            # bytes of the gradients of its trainable parameters
    freed_before_peak: int = 0   # saved bytes already released at that point (the down projection's input)
    grads_before_peak: int = 0   # gradients already made at that point (down projection, MLP adapter)


def decoder_layer(led: Ledger, x: Sym, layer, cfg, B: int, T: int, P_prefix: int, cos: Sym, i: int,
                  masked: bool = False) -> Sym:
    g = f"layer{i}"
    at, mlp = layer.self_attn, layer.mlp
    a = led.rms_norm(x, layer.input_layernorm.weight, g, f"l{i}.input_layernorm")
    q = led.project(a, at.q_proj, g, f"l{i}.q")
    k = led.project(a, at.k_proj, g, f"l{i}.k")
    v = led.project(a, at.v_proj, g, f"l{i}.v")
    q = Sym("q_rot", q.numel, torch.promote_types(q.dtype, cos.dtype), q.grad)
    k = Sym("k_rot", k.numel, torch.promote_types(k.dtype, cos.dtype), k.grad)
    mask = Sym("mask", B * T * T, torch.bool) if masked else None   # packing's block-diagonal mask
    if P_prefix:
        kv = cfg.num_key_value_heads * cfg.head_dim
        k = Sym("k_cat", B * (T + P_prefix) * kv, k.dtype, True)
        v = Sym("v_cat", B * (T + P_prefix) * kv, v.dtype, True)
        mask = Sym("mask", B * T * (T + P_prefix), torch.bool)
    o_in = led.sdpa(q, k, v, mask, B, cfg.num_attention_heads, T, g)   # the o_proj input shares its storage
    o = led.project(o_in, at.o_proj, g, f"l{i}.o")
    if hasattr(at, "adapter"):
        o = led.adapter(o, at.adapter, g, f"l{i}.attn_adapter")
    h = led.add(x, o, f"l{i}.h")
    b = led.rms_norm(h, layer.post_attention_layernorm.weight, g, f"l{i}.post_attention_layernorm")
    gt = led.project(b, mlp.gate_proj, g, f"l{i}.gate")
    up = led.project(b, mlp.up_proj, g, f"l{i}.up")
    s = led.swiglu(gt, up, g)
    d = led.project(s, mlp.down_proj, g, f"l{i}.down")
    if hasattr(mlp, "adapter"):
        d = led.adapter(d, mlp.adapter, g, f"l{i}.mlp_adapter")
    return led.add(h, d, f"l{i}.out")


def _layer_grads(layer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)


def forward(model, B: int, T: int, autocast: Optional[torch.dtype], masked: bool = False) -> tuple:
    """Replay one training forward of `model` (a lorart LlamaForCausalLM with a method attached, on any device,
    meta included) on a [B, T] batch; `masked`: with an explicit [B, 1, T, T] attention mask (packed batches).
    Returns (ledger, per-layer LayerCost list, head dict)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    led = Ledger(autocast)
    prompt = getattr(model, "prompt_encoder", None)
    prefix = getattr(model, "prefix_encoder", None)
    P_prompt = prompt.embedding.weight.shape[0] if prompt is not None else 0
    P_prefix = prefix.embedding.weight.shape[0] if prefix is not None else 0
    Tx = T + P_prompt
    x = Sym("embeds", B * T * cfg.hidden_size, emb.dtype, emb.requires_grad)
    if emb.requires_grad:
        led.save(Sym("input_ids", B * T, I64), "head")
    if prompt is not None:
        x = Sym("prompt+embeds", B * Tx * cfg.hidden_size, emb.dtype, True)
    cos = Sym("cos", B * Tx * cfg.head_dim, emb.dtype)
    if prefix is not None:
        _prefix_encoder(led, prefix, emb.dtype)
    layers = []
    cos_saved = False
    for i, layer in enumerate(model.model.layers):
        before = led.bytes()
        x_in = x
        x = decoder_layer(led, x, layer, cfg, B, Tx, P_prefix, cos, i, masked)
        saved = led.bytes() - before
        cos_saved = cos_saved or saved > 0
        layers.append(_layer_cost(saved, x_in, layer, cfg, B * Tx))
    if cos_saved:   # cos and sin, shared by every layer's RoPE
        led.save(Sym("cos", cos.numel, cos.dtype), "head")
        led.save(Sym("sin", cos.numel, cos.dtype), "head")
    before = led.bytes("head")
    hn = led.rms_norm(x, model.model.norm.weight, "head", "norm")
    head = _loss_head(led, model, hn, B, Tx)
    head["final_norm"] = led.bytes("head") - before   # what the final norm saves (the last layer's output)
    head["hn"] = hn.nbytes
    return led, layers, head


def _prefix_encoder(led: Ledger, enc, dtype: torch.dtype) -> None:
    """PrefixEncoder(): the flat prefix (cast to the model dtype), through the MLP when reparametrised."""
    w = enc.embedding.weight
    if enc.projection:
        lin1, lin2 = enc.transform[0], enc.transform[2]
        z = led.linear(Sym("prefix.embedding", w.numel(), w.dtype, True, param=True), lin1, "head", "prefix.mlp1")
        t = Sym("prefix.tanh", z.numel, z.dtype, True)
        led.save(t, "head")   # tanh saves its output, which the second linear saves as its input
        out = led.linear(t, lin2, "head", "prefix.mlp2")
    else:
        out = Sym("prefix", w.numel(), w.dtype, True)
    if out.dtype != dtype:   # not saved by autograd, but held by every layer's prefix_kv until the next forward
        led.save(Sym("prefix_cast", out.numel, dtype), "held")


def _layer_cost(saved: int, x_in: Sym, layer, cfg, N: int) -> LayerCost:
    """A layer's backward peaks in the SwiGLU backward: d(swiglu out), d(gate) and d(up) are alive with the
    residual stream's gradient, the down projection (and MLP adapter) are done: their saved input is freed,
    their weight gradients exist."""
    c = _out_dtype(layer.mlp.gate_proj).itemsize
    res = x_in.dtype.itemsize
    f, d = cfg.intermediate_size, cfg.hidden_size
    down = layer.mlp.down_proj
    s_saved = _saves_input(down)
    fwd = (0 if s_saved else N * f * c) + 2 * N * d * res
    bwd = 3 * N * f * c + N * d * res
    done = [down] + ([layer.mlp.adapter] if hasattr(layer.mlp, "adapter") else [])
    early = sum(p.numel() * p.element_size() for mod in done for p in mod.parameters() if p.requires_grad)
    return LayerCost(saved, x_in.nbytes, fwd, bwd, _layer_grads(layer),
                     freed_before_peak=N * f * _out_dtype(down).itemsize if s_saved else 0,
                     grads_before_peak=early)


def _out_dtype(m) -> torch.dtype:
    from ..nn.lora import LoRALinear, nf4_weight_of
    base = m.base_layer if isinstance(m, LoRALinear) else m
    w = nf4_weight_of(base)
    if w is not None:
        return base.compute_dtype or w.dtype
    return base.weight.dtype


def _saves_input(m) -> bool:
    from ..nn.lora import LoRALinear
    return isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and m.weight.requires_grad)


def _loss_head(led: Ledger, model, hn: Sym, B: int, T: int) -> dict:
    """lorart.ops.loss.linear_cross_entropy on h[:, :-1]: what it holds until backward ends, and its peak."""
    from ..ops.loss import default_chunk_rows
    W = model.lm_head.weight
    V, d = W.shape
    rows = B * (T - 1)
    c = hn.dtype.itemsize
    logit_dt = led.autocast.itemsize if led.autocast is not None else W.dtype.itemsize
    held = rows * d * c if hn.grad else 0             # dh, computed in forward, kept for backward
    held += V * d * 4 if W.requires_grad else 0        # dW (float32)
    chunk = min(rows, default_chunk_rows(V))
    sizes = [chunk] * (rows // chunk) + ([rows % chunk] if rows % chunk else [])
    if led.autocast is None and W.dtype == hn.dtype == torch.float32:
        # the loss's buffer path: two float32 [chunk, V] buffers (logits, log-softmax -> dlogits in place) reused
        # by every chunk
        transient = 2 * chunk * V * 4
        if W.requires_grad:   # dlogits.T @ h: a [V, d] product per chunk before it is added into dW
            transient += V * d * 4
    else:
        # per chunk: float32 logits + logsumexp's temporary of the same size (the compute-dtype logits and the
        # dlogits copy are never alive together with both); the previous chunk's float32 dlogits (and its
        # compute-dtype copy) are still referenced until this chunk's dlogits replace them
        prev_per_row = V * (4 + (logit_dt if logit_dt != 4 else 0))
        transient = max((sizes[i - 1] * prev_per_row if i else 0) + n * V * 8 for i, n in enumerate(sizes))
        if W.requires_grad:   # dlogits.T @ h: a [V, d] product per chunk before it is added into dW
            transient = max(transient, chunk * V * 4 + V * d * (logit_dt + (4 if logit_dt != 4 else 0)))
    if led.autocast is not None and W.dtype != led.autocast:
        # autocast's cached compute-dtype copy of the weight, and the explicit one made for dh per chunk
        transient += V * d * led.autocast.itemsize * (2 if hn.grad else 1)
    return {"held": held, "chunk_transient": transient, "h_copy": rows * d * c, "rows": rows,
            "chunk_rows": chunk, "vocab": V}
