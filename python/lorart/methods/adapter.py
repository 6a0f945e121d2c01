"""`adapter`: Houlsby bottleneck adapters after the attention and MLP sublayers of every decoder layer.

Each sublayer (`self_attn`, `mlp`) gets a child `adapter` (lorart.nn.BottleneckAdapter) applied to its output
by a forward hook, i.e. right after o_proj / down_proj and before the residual add, as in Houlsby et al.
Module paths of the base model are unchanged; saved keys are `model.layers.N.self_attn.adapter.down.weight`, ...
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn.bottleneck import ACTIVATIONS, BottleneckAdapter
from .base import Method, MethodError

PLACES = ("attn", "mlp")


@dataclass
class AdapterConfig:
    bottleneck: int = 32
    places: tuple = PLACES        # "attn" (after self_attn.o_proj) and/or "mlp" (after mlp.down_proj)
    activation: str = "gelu"
    init_std: float = 1e-2
    scale: float = 1.0


def _adapter_hook(module, args, output):
    return module.adapter(output)


class AdapterMethod(Method):
    name = "adapter"
    Config = AdapterConfig
    default_lr = 1e-3

    def _attach(self) -> None:
        c, model = self.config, self.model
        hidden = model.config.hidden_size
        if not isinstance(c.bottleneck, int) or not 1 <= c.bottleneck <= hidden:
            raise MethodError(f"lorart: method 'adapter': option `bottleneck`: expected an int in [1, hidden_size="
                              f"{hidden}] (a bottleneck narrower than the model), got {c.bottleneck!r}")
        places = tuple(c.places)
        if not places or any(p not in PLACES for p in places) or len(set(places)) != len(places):
            raise MethodError(f"lorart: method 'adapter': option `places`: expected a non-empty subset of {PLACES}, "
                              f"got {c.places!r}")
        if c.activation not in ACTIVATIONS:
            raise MethodError(f"lorart: method 'adapter': option `activation`: expected one of "
                              f"{sorted(ACTIVATIONS)}, got {c.activation!r}")
        for p in model.parameters():
            p.requires_grad_(False)
        w = model.get_input_embeddings().weight
        self._handles = []
        self._sublayers = []
        for layer in model.model.layers:
            for place in places:
                sub = layer.self_attn if place == "attn" else layer.mlp
                if hasattr(sub, "adapter"):
                    raise MethodError("lorart: method 'adapter': the model already has adapters (remove() them first)")
                sub.adapter = BottleneckAdapter(hidden, c.bottleneck, c.activation, c.init_std, c.scale,
                                                dtype=w.dtype if w.is_floating_point() else None, device=w.device)
                self._handles.append(sub.register_forward_hook(_adapter_hook))
                self._sublayers.append(sub)

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if ".adapter." in n}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for sub in self._sublayers:
            del sub.adapter
        self._handles, self._sublayers = [], []
