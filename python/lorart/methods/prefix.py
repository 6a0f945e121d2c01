"""`prefix`: prefix tuning (Li & Liang, 2021): P learnable key/value vectors at every attention layer.

The prefix lives at `model.prefix_encoder` in PEFT's flat layout ([P, L * 2 * kv_dim], see peft_io). A forward
pre-hook computes it (through a small MLP when `projection=True`, Li & Liang's reparametrisation for stable
training) and hands each layer its `(k, v)` through the `self_attn.prefix_kv` seam, which prepends them to the
keys/values and makes them visible to every query (the mask gets P always-true columns, cached decode
included). As in PEFT the prefix acts as a past of length P: real tokens' positions start at P and the prefix
keys get no RoPE. Init: the keys/values the base model itself computes for P real tokens (`init_text` or
sampled vocabulary), the literature's stable choice; with the MLP, PEFT's random init.
The artifact is the final prefix (the MLP is training-time only): PEFT PREFIX_TUNING `prompt_embeddings`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ._hooks import bind_forward, default_positions, past_len, seq_info
from .base import METHOD_FILE, Method, MethodError, save_tensors, write_json
from .peft_io import (PEFT_CONFIG, PEFT_WEIGHTS, layers_to_prefix, prefix_to_layers, prompt_learning_config,
                      read_prompt_embeddings, read_prompt_learning_config)


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 10
    projection: bool = False          # reparametrise through Embedding(P, kv_dim) -> Linear -> tanh -> Linear
    projection_hidden: int = 256
    init_text: Optional[str] = None
    init_token_ids: Optional[tuple] = None
    seed: int = 0


class PrefixEncoder(nn.Module):
    def __init__(self, P: int, kv_dim: int, num_layers: int, projection: bool, hidden: int, dtype=None, device=None):
        super().__init__()
        self.projection = projection
        out = num_layers * 2 * kv_dim
        if projection:
            self.embedding = nn.Embedding(P, kv_dim, dtype=dtype, device=device)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden, dtype=dtype, device=device), nn.Tanh(),
                                           nn.Linear(hidden, out, dtype=dtype, device=device))
        else:
            self.embedding = nn.Embedding(P, out, dtype=dtype, device=device)

    def forward(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if self.projection else w


class PrefixMethod(Method):
    name = "prefix"
    Config = PrefixConfig
    weights_file = PEFT_WEIGHTS
    starts_as_base = False   # the initial virtual tokens already change the outputs
    default_lr = 1e-2

    def _attach(self) -> None:
        c, model = self.config, self.model
        P = c.num_virtual_tokens
        if not isinstance(P, int) or P < 1:
            raise MethodError(f"lorart: method 'prefix': option `num_virtual_tokens` (the prefix length): expected "
                              f"an int >= 1, got {P!r}")
        if c.projection and (not isinstance(c.projection_hidden, int) or c.projection_hidden < 1):
            raise MethodError(f"lorart: method 'prefix': option `projection_hidden`: expected an int >= 1, got "
                              f"{c.projection_hidden!r}")
        if hasattr(model, "prefix_encoder"):
            raise MethodError("lorart: method 'prefix': the model already has a prefix_encoder (remove() it first)")
        mc = model.config
        self.n_kv, self.head_dim, self.L = mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers
        w = model.get_input_embeddings().weight
        for p in model.parameters():
            p.requires_grad_(False)
        projection = bool(c.projection and self.init)   # a loaded artifact is the final prefix
        enc = PrefixEncoder(P, self.n_kv * self.head_dim, self.L, projection, c.projection_hidden,
                            dtype=w.dtype, device=w.device)
        if self.init and not projection:
            with torch.no_grad():
                enc.embedding.weight.copy_(self._kv_of_tokens(model, P))
        model.prefix_encoder = enc
        self._handles = [model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]

    def _kv_of_tokens(self, model, P: int) -> torch.Tensor:
        c = self.config
        vocab = model.config.vocab_size
        if c.init_token_ids:
            ids = [int(i) for i in c.init_token_ids]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise MethodError(f"lorart: method 'prefix': option `init_token_ids`: id {bad[0]} is outside the "
                                  f"vocabulary [0, {vocab})")
            ids = torch.tensor((ids * (-(-P // len(ids))))[:P])
        else:
            ids = torch.randint(0, vocab, (P,), generator=torch.Generator().manual_seed(c.seed))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                cache = model(ids[None].to(model.device), use_cache=True).past_key_values
        finally:
            model.train(was)
        return layers_to_prefix([(cache.keys[i], cache.values[i]) for i in range(self.L)])

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def prefix(self) -> torch.Tensor:
        """The flat prefix [P, L * 2 * kv_dim] (PEFT layout)."""
        return self.model.prefix_encoder()

    def _pre_hook(self, model, args, kwargs):
        kw = bind_forward(model, args, kwargs)
        B, T, dev = seq_info(kw, model)
        P = self.config.num_virtual_tokens
        dtype = model.get_input_embeddings().weight.dtype
        kvs = prefix_to_layers(self.prefix().to(dtype), self.L, self.n_kv, self.head_dim)
        for layer, kv in zip(model.model.layers, kvs):
            layer.self_attn.prefix_kv = kv
        pos = kw["position_ids"]
        if pos is None:
            pos = default_positions(kw, B, T, past_len(kw), dev)
        kw["position_ids"] = pos.to(dev) + P
        return (), kw

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"prefix_encoder.{n}": p for n, p in self.model.prefix_encoder.named_parameters()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix().detach()}

    def _write(self, folder: str) -> None:
        save_tensors(os.path.join(folder, PEFT_WEIGHTS), self.state_dict())
        write_json(os.path.join(folder, PEFT_CONFIG), prompt_learning_config(self.model, "PREFIX_TUNING",
                                                                              self.config.num_virtual_tokens,
                                                                              self.base_model_name))

    def _read(self, folder: str) -> None:
        cfg = read_prompt_learning_config(folder, "PREFIX_TUNING", self.model)
        if cfg["num_virtual_tokens"] != self.config.num_virtual_tokens:
            raise MethodError(f"lorart: {os.path.join(folder, PEFT_CONFIG)}: key `num_virtual_tokens` is "
                              f"{cfg['num_virtual_tokens']} but {METHOD_FILE} says {self.config.num_virtual_tokens}")
        w = self.model.prefix_encoder.embedding.weight
        val = read_prompt_embeddings(folder, cfg, w.shape[1])
        with torch.no_grad():
            w.copy_(val.to(w.dtype))

    @classmethod
    def from_peft(cls, model: nn.Module, directory: str, trainable: bool = False) -> "PrefixMethod":
        cfg = read_prompt_learning_config(directory, "PREFIX_TUNING", model)
        if cfg.get("prefix_projection") and not cfg.get("inference_mode", True):
            raise MethodError(f"lorart: {os.path.join(directory, PEFT_CONFIG)}: key `prefix_projection`: a "
                              "training-mode projected prefix cannot be loaded (PEFT saves the MLP's output only)")
        self = cls(model, PrefixConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"])), init=False)
        self._read(directory)
        for p in self.trainable_parameters():
            p.requires_grad_(trainable)
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.model.model.layers:
            layer.self_attn.prefix_kv = None
        del self.model.prefix_encoder
