"""`lora` and `qlora`: lorart.inject's LoRA / QLoRA (NF4 base) behind the Method interface.

Artifacts are PEFT LoRA folders (adapter_config.json + adapter_model.safetensors) plus lorart_method.json.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import (CONFIG_NAME, WEIGHTS_NAME, adapter_config, adapter_state_dict, load_adapter,
                        read_lora_folder)
from ..inject import inject, lora_layers, match_targets, merge, unmerge
from ..models.hub import nf4_factory
from ..nn.nf4_linear import NF4Linear
from .base import Method, MethodError, base_param_count, save_tensors, write_json

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoRAConfig:
    targets: tuple = DEFAULT_TARGETS   # module names (PEFT suffix rule), a regex string, or "all-linear"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    rslora: bool = False


@dataclass
class QLoRAConfig(LoRAConfig):
    blocksize: int = 64
    double_quant: bool = True


class LoRAMethod(Method):
    name = "lora"
    Config = LoRAConfig
    weights_file = WEIGHTS_NAME
    default_lr = 1e-3
    train_options = ("targets", "r", "alpha", "dropout", "rslora")
    quantize = None

    def _attach(self) -> None:
        c = self.config
        if not isinstance(c.r, int) or c.r < 1:
            raise MethodError(f"lorart: method {self.name!r}: option `r`: expected an int >= 1, got {c.r!r}")
        targets = c.targets if isinstance(c.targets, str) else list(c.targets)
        extra = dict(blocksize=c.blocksize, double_quant=c.double_quant) if self.quantize else {}
        inject(self.model, targets=targets, r=c.r, alpha=c.alpha, dropout=c.dropout, quantize=self.quantize,
               rslora=c.rslora, **extra)

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for path, m in lora_layers(self.model).items():
            out[f"base_model.model.{path}.lora_A.weight"] = m.lora_A["default"].weight
            out[f"base_model.model.{path}.lora_B.weight"] = m.lora_B["default"].weight
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model)

    def _write(self, folder: str) -> None:
        save_tensors(os.path.join(folder, WEIGHTS_NAME), self.state_dict())
        write_json(os.path.join(folder, CONFIG_NAME), adapter_config(self.model, base_model_name_or_path=self.base_model_name))

    def merge(self) -> bool:
        merge(self.model)
        return True

    def unmerge(self) -> None:
        unmerge(self.model)

    def remove(self) -> None:
        unmerge(self.model)
        for path, m in lora_layers(self.model).items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, m.base_layer)

    @classmethod
    def from_peft(cls, model: nn.Module, directory: str, trainable: bool = False) -> "LoRAMethod":
        """Attach a PEFT LoRA folder written by any tool (no lorart_method.json)."""
        method = cls._from_folder(model, directory, None)
        for p in method.trainable_parameters():
            p.requires_grad_(trainable)
        return method

    @classmethod
    def _from_folder(cls, model: nn.Module, directory: str, config) -> "LoRAMethod":
        """PEFT's files are the truth (lorart.adapters.read_lora_folder: adapter_config.json, and its agreement
        with lorart_method.json); for qlora the adapted layers are quantized first, as in training."""
        cfg, pairs = read_lora_folder(directory)
        self = cls.__new__(cls)
        self.model, self.init = model, False
        self.base_params = base_param_count(model)
        if cls.quantize:
            c = config or cls.Config()
            _quantize_targets(model, sorted(pairs), blocksize=c.blocksize, double_quant=c.double_quant)
        load_adapter(model, directory)
        targets = cfg.targets if isinstance(cfg.targets, str) else tuple(cfg.targets or sorted(pairs))
        self.config = config or cls.Config(targets=targets, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                           rslora=cfg.rslora)
        return self


def _quantize_targets(model: nn.Module, targets, blocksize: int = 64, double_quant: bool = True) -> None:
    for path in match_targets(model, targets):
        m = model.get_submodule(path)
        if isinstance(m, nn.Linear):
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf,
                    NF4Linear.from_linear(m, blocksize=blocksize, double_quant=double_quant).train(m.training))


class QLoRAMethod(LoRAMethod):
    """LoRA on an NF4-quantized base (bitsandbytes-exact NF4, double quantization by default)."""
    name = "qlora"
    Config = QLoRAConfig
    quantize = "nf4"
    default_lr = 1e-3
    starts_as_base = False   # the base is quantized: its outputs already differ before training

    @classmethod
    def base_linear_factory(cls, config, dtype: torch.dtype):
        """Every linear layer of the base becomes an NF4Linear as soon as its weight is read, so the
        full-precision model is never held at once (the layers LoRA targets get wrapped afterwards)."""
        return nf4_factory(dtype, blocksize=config.blocksize, double_quant=config.double_quant)

    def merge(self) -> bool:
        merge(self.model)   # builds dequant(W4) + s*B@A in the compute dtype (the packed base is kept)
        return True

    def remove(self) -> None:
        raise MethodError("lorart: qlora: remove() cannot restore the float base (it was quantized to NF4); "
                          "reload the base model instead")
