"""`prompt`: soft-prompt tuning (Lester et al., 2021): P learnable embeddings prepended to the input.

The prompt lives at `model.prompt_encoder.embedding.weight` [P, hidden] (PEFT's name and layout). A forward
pre-hook prepends it on the first call of a sequence (no cache yet); the attention mask gets P ones in front,
labels get P x -100, positions run 0..P-1 over the virtual tokens and continue from P (PEFT's convention).
Later cached decode steps only extend the mask. A forward hook drops the P virtual positions from the logits,
so outputs line up with the caller's tokens (PEFT returns them; compare `logits[:, P:]`).
Init: the embeddings of `init_text`'s tokens (repeated/truncated to P), else of P tokens sampled from the
vocabulary (Lester et al.'s recommendation over random vectors).
Artifact: PEFT PROMPT_TUNING (`adapter_model.safetensors`, key `prompt_embeddings` [P, hidden]).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..data.formats import IGNORE_INDEX
from ._hooks import bind_forward, extend_mask_front, extend_mask_square, past_len, seq_info
from .base import METHOD_FILE, Method, MethodError, save_tensors, write_json
from .peft_io import (PEFT_CONFIG, PEFT_WEIGHTS, prompt_learning_config, read_prompt_embeddings,
                      read_prompt_learning_config)


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 20
    init_text: Optional[str] = None   # tokenized with `tokenizer` passed to prepare(); else sampled vocabulary
    init_token_ids: Optional[tuple] = None
    seed: int = 0


class PromptEmbedding(nn.Module):
    def __init__(self, num_virtual_tokens: int, hidden: int, dtype=None, device=None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, dtype=dtype, device=device)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptMethod(Method):
    name = "prompt"
    Config = PromptConfig
    weights_file = PEFT_WEIGHTS
    starts_as_base = False   # the initial virtual tokens already change the outputs
    default_lr = 3e-2

    def _attach(self) -> None:
        c, model = self.config, self.model
        P = c.num_virtual_tokens
        if not isinstance(P, int) or P < 1:
            raise MethodError(f"lorart: method 'prompt': option `num_virtual_tokens`: expected an int >= 1, got {P!r}")
        if hasattr(model, "prompt_encoder"):
            raise MethodError("lorart: method 'prompt': the model already has a prompt_encoder (remove() it first)")
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        enc = PromptEmbedding(P, model.config.hidden_size, dtype=emb.weight.dtype, device=emb.weight.device)
        if self.init:
            with torch.no_grad():
                enc.embedding.weight.copy_(emb(self._init_ids(emb.num_embeddings).to(emb.weight.device)))
        model.prompt_encoder = enc
        self._strip = 0
        self._handles = [model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                         model.register_forward_hook(self._post_hook)]

    def _init_ids(self, vocab: int) -> torch.Tensor:
        c, P = self.config, self.config.num_virtual_tokens
        ids = list(c.init_token_ids) if c.init_token_ids else None
        if ids is not None:
            bad = [i for i in ids if not 0 <= int(i) < vocab]
            if bad:
                raise MethodError(f"lorart: method 'prompt': option `init_token_ids`: id {bad[0]} is outside the "
                                  f"vocabulary [0, {vocab})")
        if not ids:
            g = torch.Generator().manual_seed(c.seed)
            return torch.randint(0, vocab, (P,), generator=g)
        ids = (ids * (-(-P // len(ids))))[:P]
        return torch.tensor(ids, dtype=torch.long)

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def _pre_hook(self, model, args, kwargs):
        kw = bind_forward(model, args, kwargs)
        B, T, dev = seq_info(kw, model)
        P = self.config.num_virtual_tokens
        if past_len(kw) == 0:   # first call of the sequence: put the virtual tokens in front
            emb = kw["inputs_embeds"]
            if emb is None:
                emb = model.get_input_embeddings()(kw["input_ids"])
            prompt = model.prompt_encoder().to(emb.dtype)
            kw["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), emb], dim=1)
            kw["input_ids"] = None
            m = kw["attention_mask"]
            if m is not None:
                kw["attention_mask"] = extend_mask_square(m, P) if m.dim() == 4 else extend_mask_front(m, P, T)
            if kw["labels"] is not None:
                lab = kw["labels"]
                kw["labels"] = torch.cat([lab.new_full((B, P), IGNORE_INDEX), lab], dim=1)
            if kw["position_ids"] is not None:
                pos = kw["position_ids"].to(dev).expand(B, T)
                kw["position_ids"] = torch.cat([torch.arange(P, device=dev).expand(B, P), pos + P], dim=1)
            self._strip = 0 if kw["logits_to_keep"] else P
        else:                   # cached decode: the cache already holds the virtual tokens
            kw["attention_mask"] = extend_mask_front(kw["attention_mask"], P, T)
            if kw["position_ids"] is not None:
                kw["position_ids"] = kw["position_ids"] + P
            self._strip = 0
        return (), kw

    def _post_hook(self, model, args, output):
        strip, self._strip = self._strip, 0
        if strip and output.logits is not None:
            output.logits = output.logits[:, strip:]
        return output

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.model.prompt_encoder.embedding.weight}

    def _write(self, folder: str) -> None:
        save_tensors(os.path.join(folder, PEFT_WEIGHTS), self.state_dict())
        write_json(os.path.join(folder, PEFT_CONFIG), prompt_learning_config(self.model, "PROMPT_TUNING",
                                                                              self.config.num_virtual_tokens,
                                                                              self.base_model_name))

    def _read(self, folder: str) -> None:
        cfg = read_prompt_learning_config(folder, "PROMPT_TUNING", self.model)
        if cfg["num_virtual_tokens"] != self.config.num_virtual_tokens:
            raise MethodError(f"lorart: {os.path.join(folder, PEFT_CONFIG)}: key `num_virtual_tokens` is "
                              f"{cfg['num_virtual_tokens']} but {METHOD_FILE} says {self.config.num_virtual_tokens}")
        w = self.model.prompt_encoder.embedding.weight
        val = read_prompt_embeddings(folder, cfg, w.shape[1])
        with torch.no_grad():
            w.copy_(val.to(w.dtype))

    @classmethod
    def from_peft(cls, model: nn.Module, directory: str, trainable: bool = False) -> "PromptMethod":
        cfg = read_prompt_learning_config(directory, "PROMPT_TUNING", model)
        self = cls(model, PromptConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"])), init=False)
        self._read(directory)
        for p in self.trainable_parameters():
            p.requires_grad_(trainable)
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        del self.model.prompt_encoder
