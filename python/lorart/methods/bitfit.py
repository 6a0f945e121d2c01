"""`bitfit`: only bias terms train (Ben Zaken et al., 2022).

Llama-family models have no biases: BitFit adds zero-initialised biases to the chosen linear layers (so the
model starts exactly as the base model) and trains only those; layers that already have a bias train it.
`report()` says how many biases were added. Biases are part of the linear layers, so there is nothing to
merge and no inference overhead beyond one add per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..inject import match_targets
from ..nn.nf4_linear import NF4Linear
from .base import Method, MethodError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class BitFitConfig:
    targets: tuple = DEFAULT_TARGETS   # linear layer names (PEFT suffix rule), a regex string or "all-linear"


class BitFitMethod(Method):
    name = "bitfit"
    Config = BitFitConfig
    default_lr = 3e-3
    keeps_dtypes = True   # the biases are added by their linear layer, in its dtype

    def _attach(self) -> None:
        targets = self.config.targets if isinstance(self.config.targets, str) else list(self.config.targets)
        paths = [p for p in match_targets(self.model, targets)
                 if isinstance(self.model.get_submodule(p), (nn.Linear, NF4Linear))]
        if not paths:
            raise MethodError(f"lorart: method 'bitfit': option `targets`: {self.config.targets!r} matched no "
                              f"nn.Linear layer of {type(self.model).__name__} (BitFit needs linear layers whose "
                              "biases it can train)")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.paths, self.added = paths, []
        for path in paths:
            m = self.model.get_submodule(path)
            if m.bias is None:
                w = m.weight  # an NF4Linear (4-bit base) adds its bias in its compute dtype
                dtype = w.dtype if isinstance(m, nn.Linear) else (m.compute_dtype or w.dtype)
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=dtype, device=w.device))
                self.added.append(path)
            m.bias.requires_grad_(True)

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{p}.bias": self.model.get_submodule(p).bias for p in self.paths}

    def report(self) -> dict:
        r = super().report()
        r["added_biases"] = len(self.added)
        return r

    def merge(self) -> bool:
        return True   # biases live in the linear layers already

    def remove(self) -> None:
        for path in self.added:
            self.model.get_submodule(path).bias = None
        self.added = []
