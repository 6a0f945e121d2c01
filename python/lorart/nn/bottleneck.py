"""BottleneckAdapter: Houlsby et al. (2019) adapter, `h + up(act(down(h)))`.

    down: Linear(hidden, bottleneck)  weights ~ N(0, init_std), truncated at 2 std; bias 0
    up:   Linear(bottleneck, hidden)  weights 0, bias 0   -> the adapter starts as the identity
    scale: multiplies the up-projection's output (1.0 in Houlsby; some variants use < 1)

It is inserted after a sublayer's output projection, before the residual add (lorart.methods' `adapter`
places one after attention's o_proj and one after the MLP's down_proj in every decoder layer).
A plain torch module (two GEMMs and one activation); no fused kernel: docs/methods.md has the measured
cost of the activation and residual beside the two GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, bottleneck: int, activation: str = "gelu", init_std: float = 1e-2,
                 scale: float = 1.0, dtype=None, device=None):
        super().__init__()
        if not isinstance(bottleneck, int) or not 1 <= bottleneck <= hidden_size:
            raise ValueError(f"lorart: BottleneckAdapter: argument `bottleneck`: expected an int in [1, hidden_size="
                             f"{hidden_size}] (a bottleneck is narrower than the hidden size), got {bottleneck!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"lorart: BottleneckAdapter: argument `activation`: expected one of "
                             f"{sorted(ACTIVATIONS)}, got {activation!r}")
        if init_std < 0:
            raise ValueError(f"lorart: BottleneckAdapter: argument `init_std`: expected >= 0, got {init_std}")
        self.hidden_size, self.bottleneck, self.activation, self.scale = hidden_size, bottleneck, activation, scale
        self.down = nn.Linear(hidden_size, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, hidden_size, dtype=dtype, device=device)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = ACTIVATIONS[self.activation](self.down(h.to(self.down.weight.dtype)))
        return h + (self.scale * self.up(z)).to(h.dtype)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, bottleneck={self.bottleneck}, activation={self.activation}, "
                f"scale={self.scale}")
