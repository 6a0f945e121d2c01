"""One forward over many requests: their tokens packed into one row of N tokens, each request with its own KV
cache and its own adapter.

The linear layers see all N tokens at once (one GEMM per layer; LoRA layers add each row's adapter through the
grouped op ``lora_grouped_add_``); attention runs per request on that request's cache, with exactly the calls a
single-request ``lorart.models.generate`` makes (full causal attention over the prompt, then one query per step),
so a request's tokens do not depend on what else is in the batch (up to the rounding of batched GEMMs, see
docs/serve.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import lora_layers


class SequenceCache:
    """One request's keys and values for every layer, ``[1, kv_heads, capacity, head_dim]`` buffers that grow by
    doubling up to ``limit`` tokens (the request's prompt + max_tokens). ``length`` tokens are valid."""

    def __init__(self, num_layers: int, limit: int):
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.length = 0
        self.limit = int(limit)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys/values ``[1, kv_heads, T, head_dim]`` after the valid ones of `layer`; return
        views of all of them. ``advance(T)`` commits the step once every layer has appended."""
        n = self.length + k.shape[2]
        if n > self.limit:
            raise RuntimeError(f"lorart: serving: a request's KV cache would hold {n} tokens, over its limit "
                               f"{self.limit}")
        kb, vb = self.k[layer], self.v[layer]
        if kb is None or kb.shape[2] < n:
            cap = min(self.limit, max(n, 32, 2 * (0 if kb is None else kb.shape[2])))
            nk = k.new_empty(1, k.shape[1], cap, k.shape[3])
            nv = v.new_empty(1, v.shape[1], cap, v.shape[3])
            if kb is not None and self.length:
                nk[:, :, :self.length] = kb[:, :, :self.length]
                nv[:, :, :self.length] = vb[:, :, :self.length]
            self.k[layer], self.v[layer] = kb, vb = nk, nv
        kb[:, :, self.length:n] = k
        vb[:, :, self.length:n] = v
        return kb[:, :, :n], vb[:, :, :n]

    def advance(self, tokens: int) -> None:
        self.length += int(tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class PackedStep:
    """The `cache` argument of the decoder layers for one packed forward: request i owns tokens
    ``spans[i] = (start, end)`` of the row and attends only to its own cache. A request feeding more than one
    token is a prompt on an empty cache (the engine never splits a prompt), so its attention is plain causal."""

    def __init__(self, caches: list[SequenceCache], lengths: list[int]):
        self.caches = caches
        self.spans = []
        a = 0
        for c, n in zip(caches, lengths):
            if n > 1 and c.length:
                raise RuntimeError("lorart: serving: a multi-token step on a non-empty cache (not supported)")
            self.spans.append((a, a + n))
            a += n

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        outs = []
        for cache, (a, b) in zip(self.caches, self.spans):
            kk, vv = cache.append(layer_idx, k[:, :, a:b], v[:, :, a:b])
            outs.append(F.scaled_dot_product_attention(q[:, :, a:b], kk, vv, is_causal=b - a > 1, enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class AdapterRows:
    """Per-row adapter selection for every LoRA layer of the model, passed explicitly as index tensors (no
    model-wide "active adapter", no thread-local context): layers are grouped by their adapter list, each group
    gets one index tensor per forward. Only the engine thread (the one thread running the model) uses it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's LoRA layers and their adapter lists (after an adapter was loaded or removed)."""
        token, seq = {}, {}
        for path, m in lora_layers(self.model).items():
            # decoder layers see every token; layers after the final norm (lm_head) only each request's last one
            groups = token if path.startswith("model.layers.") else seq
            groups.setdefault(tuple(m.adapter_names), []).append(m)
        self._token_groups, self._seq_groups = list(token.items()), list(seq.items())

    def bind(self, keys: list, lengths: list[int]) -> None:
        """Select adapter `keys[i]` (an adapter name in the layers, or None for the base model) for the
        `lengths[i]` tokens of request i in the next forward."""
        lens = torch.tensor(lengths, dtype=torch.int64)
        for groups, per_token in ((self._token_groups, True), (self._seq_groups, False)):
            for names, layers in groups:
                pos = {n: i for i, n in enumerate(names)}
                idx = torch.tensor([pos.get(k, -1) for k in keys], dtype=torch.int64)
                if per_token:
                    idx = idx.repeat_interleave(lens)
                dev = _layer_device(layers[0])
                idx = idx.to(dev)
                for m in layers:
                    m.adapter_ids = idx

    def clear(self) -> None:
        for groups in (self._token_groups, self._seq_groups):
            for _, layers in groups:
                for m in layers:
                    m.adapter_ids = None


def _layer_device(m) -> torch.device:
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return torch.device("cpu")


def packed_forward(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, step: PackedStep,
                   last_rows: torch.Tensor) -> torch.Tensor:
    """Logits ``[len(last_rows), vocab]`` (float32) at rows `last_rows` of the packed `tokens` ``[N]`` at
    `positions` ``[N]`` (each request's own positions), through lorart's Llama decoder layers."""
    inner = model.model
    x = inner.embed_tokens(tokens[None])
    cos, sin = inner.rotary_emb(positions[None], x.dtype)
    for layer in inner.layers:
        x = layer(x, cos, sin, None, step)
    h = inner.norm(x[:, last_rows])
    return model.lm_head(h)[0].float()
