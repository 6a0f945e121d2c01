"""Llama-family causal LM in plain torch, with Hugging Face module names.

Module paths match transformers exactly (`model.layers.N.self_attn.q_proj`, ...), so HF
state_dicts load 1:1 and PEFT adapter keys line up. Every projection is a plain `nn.Linear`,
which `lorart.inject` may replace by name.

Seams for other methods:
- `inputs_embeds=` replaces the token embedding lookup (prompt tuning).
- `LlamaAttention.prefix_kv` (None or a `(k, v)` pair shaped `[B or 1, n_kv_heads, P, head_dim]`)
  is prepended to the keys/values of that layer and is visible to every query (prefix tuning).
  The prefix keys are used as given (no RoPE is applied to them).
- A cache object with an `attend(layer_idx, q, k, v)` method (q/k/v after RoPE, `[1, heads, N, head_dim]`)
  computes the attention itself: lorart.serving packs the tokens of many requests into one row of N tokens,
  each request attending only to its own keys (per-request KV caches, continuous batching).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops._common import runs_on
from ..ops.act import swiglu
from ..ops.loss import linear_cross_entropy
from ..ops.norm import MAX_HIDDEN_CUDA, rms_norm
from .config import LlamaConfig

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    past_key_values: Optional["KVCache"] = None


class KVCache:
    """Per-layer key/value cache; keys are stored after RoPE, shaped [B, n_kv_heads, S, head_dim]."""

    def __init__(self, num_layers: int):
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight.dtype == x.dtype and runs_on(x) and not (x.is_cuda and x.shape[-1] > MAX_HIDDEN_CUDA)
                and x.shape[-1] > 0):
            return rms_norm(x, self.weight, self.eps)  # same arithmetic; backward keeps x and rstd only
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", config.rope_inv_freq(), persistent=False)

    def reset(self, device=None) -> None:
        """Recompute inv_freq (needed after building the model on the meta device)."""
        self.inv_freq = self.config.rope_inv_freq(device=device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
            emb = torch.cat([freqs, freqs], dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D] (HF rotate-half layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=config.o_proj_bias)
        self.prefix_kv: Optional[tuple] = None

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and hasattr(cache, "attend"):  # packed sequences, each with its own cache (serving)
            out = cache.attend(self.layer_idx, q, k, v)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        is_causal = mask is None and T > 1 and k.shape[2] == T
        if self.prefix_kv is not None:
            pk, pv = self.prefix_kv
            P = pk.shape[2]
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
            if mask is None:
                S = k.shape[2] - P
                i = torch.arange(T, device=x.device)[:, None] + (S - T)
                mask = (torch.arange(S, device=x.device)[None, :] <= i)[None, None].expand(B, 1, T, S)
            mask = torch.cat([mask.new_ones(B, 1, T, P), mask.expand(B, 1, T, -1)], dim=-1)
            is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        if g.dtype == u.dtype and g.shape == u.shape and runs_on(g):  # one pass; backward keeps g and u only
            return self.down_proj(swiglu(g, u))
        return self.down_proj(F.silu(g) * u)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sliding = config.is_sliding(layer_idx)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def _build_mask(pad_mask, B, T, past, device, window=None):
    """Bool mask [B, 1, T, past+T] (True = attend): causal in cache positions, padding removed.

    Each query may always see itself, so rows of padding queries never become all-False (NaN).
    """
    S = past + T
    qi = torch.arange(T, device=device)[:, None] + past
    kj = torch.arange(S, device=device)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (kj > qi - window)
    allowed = allowed[None, None]
    if pad_mask is not None:
        allowed = allowed & pad_mask[:, None, None, :].bool()
    allowed = allowed | (kj == qi)[None, None]
    return allowed.expand(B, 1, T, S)


class LlamaForCausalLM(nn.Module):
    supports_chunked_loss = True  # forward(labels=..., return_logits=False): loss without the full logits

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None,
                past_key_values: Optional[KVCache] = None, use_cache: bool = False,
                inputs_embeds=None, logits_to_keep: int = 0, loss_reduction: str = "mean",
                return_logits: bool = True) -> CausalLMOutput:
        """attention_mask: [B, past + T] (1 = token, 0 = padding; left or right padding) or a bool
        [B, 1, T, past + T] mask (True = attend, e.g. packed documents). Outputs at padding
        positions are unspecified. position_ids default to the count of real tokens before each
        position. labels: next-token targets (-100 = ignored), shifted inside; the loss is their mean
        (loss_reduction="mean") or sum ("sum"). return_logits=False with labels: the loss comes from
        lorart.ops.loss.linear_cross_entropy (chunked; the [tokens, vocab] logits are never formed) and
        the output's logits are None."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                                 f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
            inputs_embeds = self.model.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], "
                             f"got {tuple(inputs_embeds.shape)}")
        B, T, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if ckpt and (use_cache or past_key_values is not None):
            warnings.warn("use_cache is ignored while gradient checkpointing in training mode")
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.num_hidden_layers)
        past = past_key_values.seq_len if past_key_values is not None else 0

        masks = {False: None, True: None}
        pad = None
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool or attention_mask.shape != (B, 1, T, past + T):
                raise ValueError(f"a 4D attention_mask must be bool [{B}, 1, {T}, {past + T}], got "
                                 f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
            diag = torch.arange(T, device=dev)[:, None] + past == torch.arange(past + T, device=dev)
            attention_mask = attention_mask.to(dev) | diag  # padding rows must not be all-False
            masks = {False: attention_mask, True: attention_mask}
        else:
            if attention_mask is not None:
                if attention_mask.shape != (B, past + T):
                    raise ValueError(f"attention_mask must be [batch, past + seq] = [{B}, {past + T}], "
                                     f"got {tuple(attention_mask.shape)}")
                pad = None if bool(attention_mask.all()) else attention_mask.to(dev)
                if pad is not None and past == 0 and not bool((pad[:, 1:] > pad[:, :-1]).any()):
                    # right padding only: causal attention never reaches the trailing pads, so the
                    # plain causal path (flash kernels) is exact for every real token
                    pad = None
            if position_ids is None and pad is not None:
                position_ids = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            if pad is not None or (past > 0 and T > 1):
                masks[False] = _build_mask(pad, B, T, past, dev)
            if self.config.sliding_window is not None and past + T > self.config.sliding_window:
                masks[True] = _build_mask(pad, B, T, past, dev, self.config.sliding_window)
            else:
                masks[True] = masks[False]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=dev)[None].expand(B, T)
        elif position_ids.shape != (B, T):
            position_ids = position_ids.expand(B, T)
        cos, sin = self.model.rotary_emb(position_ids.to(dev), inputs_embeds.dtype)

        h = inputs_embeds
        for layer in self.model.layers:
            mask = masks[layer.sliding]
            if ckpt:
                h = checkpoint(layer, h, cos, sin, mask, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, past_key_values)
        h = self.model.norm(h)
        if logits_to_keep:
            if labels is not None:
                raise ValueError("labels cannot be combined with logits_to_keep")
            h = h[:, -logits_to_keep:]
        if labels is not None and labels.shape != (B, T):
            raise ValueError(f"labels must have shape {(B, T)}, got {tuple(labels.shape)}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction: expected 'mean' or 'sum', got {loss_reduction!r}")
        if labels is not None and not return_logits and _plain_linear(self.lm_head):
            logits = None
            loss = linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), self.lm_head.weight,
                                        labels[:, 1:].reshape(-1).to(dev), self.lm_head.bias,
                                        ignore_index=IGNORE_INDEX, reduction=loss_reduction)
        else:
            logits = self.lm_head(h)
            loss = None if labels is None else causal_lm_loss(logits, labels, loss_reduction)
        return CausalLMOutput(logits=logits, loss=loss,
                              past_key_values=past_key_values if use_cache else None)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (fp32), mean over labels != -100 (0 when there are none), or their sum."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear computing exactly F.linear(x, weight, bias) (not a LoRA/NF4 wrapper or a subclass)."""
    return (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and not m._forward_hooks
            and not m._forward_pre_hooks)
