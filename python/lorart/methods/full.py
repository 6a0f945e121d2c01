"""`full`: every parameter trains (the baseline PEFT methods are compared against).

Uses lorart.optim.PagedAdamW (optimizer states paged to host memory beyond a GPU budget) and, with
`gradient_checkpointing=True`, recomputes each decoder layer in backward. The artifact is a Hugging Face model
folder (config.json + model.safetensors, tied weights stored once) that transformers loads too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..models import save_hf_folder
from ..nn.lora import nf4_weight_of
from .base import Method, MethodError, expect_tensor, read_safetensors

MODEL_FILE = "model.safetensors"


@dataclass
class FullConfig:
    gradient_checkpointing: bool = False
    train_embeddings: bool = True   # False freezes the (often tied) token embeddings / lm_head


class FullMethod(Method):
    name = "full"
    Config = FullConfig
    optimizer = "paged_adamw"
    default_lr = 1e-4
    weights_file = MODEL_FILE
    saves_whole_model = True

    def _attach(self) -> None:
        frozen4 = [n for n, m in self.model.named_modules() if nf4_weight_of(m) is not None]
        if frozen4:
            raise MethodError(f"lorart: method 'full': {len(frozen4)} linear layers of the model are stored in 4-bit "
                              f"(NF4, e.g. {frozen4[0]}) and cannot be trained; load a dense model for full "
                              "fine-tuning, or train the 4-bit base with qlora, lora, adapter, bitfit, prefix or prompt")
        emb = self.model.get_input_embeddings().weight
        for p in self.model.parameters():
            p.requires_grad_(self.config.train_embeddings or p is not emb)
        if not self.config.train_embeddings and getattr(self.model, "lm_head", None) is not None:
            self.model.lm_head.weight.requires_grad_(False)
        self._was_ckpt = getattr(self.model, "gradient_checkpointing", False)
        if self.config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _write(self, folder: str) -> None:
        save_hf_folder(self.model, folder)

    def _read(self, folder: str) -> None:
        path = os.path.join(folder, MODEL_FILE)
        tensors = read_safetensors(path)
        params = dict(self.model.named_parameters())
        extra = sorted(set(tensors) - set(params))
        if extra:
            raise MethodError(f"lorart: {path}: key `{extra[0]}`: not a parameter of {type(self.model).__name__}")
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                if k == "lm_head.weight" and k not in tensors and self.model.config.tie_word_embeddings:
                    continue
                p.copy_(expect_tensor(tensors, k, tuple(p.shape), path).to(p.dtype))

    def merge(self) -> bool:
        return True

    def remove(self) -> None:
        if not self._was_ckpt:
            self.model.gradient_checkpointing_disable()
