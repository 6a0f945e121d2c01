"""NF4Linear: a frozen 4-bit (bitsandbytes-exact NF4) linear layer.

    layer = NF4Linear.from_linear(nn.Linear(4096, 4096), blocksize=64, double_quant=True)
    y = layer(x)                 # x @ dequant(W).T + b, gradients to x (and b when trainable)
    layer.state_dict()           # the Hugging Face bnb Linear4bit keys: weight, weight.absmax, ...

The packed nibbles and scales are buffers (so `.to(device)` moves them); `layer.weight` is the
NF4Weight over them. state_dict / load_state_dict speak the HF bnb-4bit keys. `layer.shardable()` holds them as
frozen parameters instead, which FSDP2 shards (docs/distributed.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import nf4 as _nf4
from ..ops.nf4 import nf4_linear

_BUFFERS = ("_nf4_packed", "_nf4_absmax", "_nf4_nested_absmax", "_nf4_nested_code")


class NF4Linear(nn.Module):
    """y = x @ dequant(W).T + bias with W [out_features, in_features] frozen in NF4.

    compute_dtype: the dtype the matmul runs in (x is cast to it and the result cast back
    to x's dtype); default the original weight dtype."""

    def __init__(self, weight: _nf4.NF4Weight, bias: Optional[Tensor] = None, train_bias: bool = False,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"lorart: NF4Linear: expected a 2-d weight [out, in], got shape {list(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._storage_params = False
        self._set_weight(weight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"lorart: NF4Linear: `bias` must have shape [{self.out_features}], "
                                 f"got {list(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=train_bias)
        else:
            self.register_parameter("bias", None)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, train_bias: bool = False) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"lorart: NF4Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = _nf4.quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(w, linear.bias, train_bias=train_bias, compute_dtype=compute_dtype)

    # ---- the weight over the buffers ------------------------------------------------------
    def _set_weight(self, w: _nf4.NF4Weight) -> None:
        for name, t in zip(_BUFFERS, (w.packed, w.absmax, w.nested_absmax, w.nested_code)):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
            if self._storage_params and t is not None:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t, persistent=False)
        self._meta = (w.offset, w.blocksize, torch.Size(w.shape), w.dtype)
        self._weight = None if self._storage_params else w   # parameters: `weight` builds over them

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._weight = None  # the buffers moved (.to(), .cuda(), ...): `weight` rebuilds from them
        return out

    @property
    def weight(self) -> _nf4.NF4Weight:
        """The NF4Weight over the storage (one object, built once per move or swap, passed to the ops whole). Held
        as parameters (`shardable`), the storage is swapped by FSDP2 at each all-gather and reshard: the object is
        rebuilt when it no longer holds the module's current tensors."""
        w = self._weight
        if w is not None and self._storage_params and any(
                a is not b for a, b in zip(self._storage(), (w.packed, w.absmax, w.nested_absmax, w.nested_code))):
            w = None
        if w is None:
            offset, blocksize, shape, dtype = self._meta
            w = self._weight = _nf4.NF4Weight(*self._storage(), offset, blocksize, shape, dtype)
        return w

    def _storage(self) -> tuple:
        """The packed codes, absmax, nested absmax and code: the buffers, or the parameters of `shardable`."""
        return tuple(self._parameters[n] if n in self._parameters else self._buffers[n] for n in _BUFFERS)

    def shardable(self) -> "NF4Linear":
        """Hold the 4-bit storage (packed codes, absmax, nested scales) as frozen parameters (requires_grad=False)
        instead of buffers, so that FSDP2 (`torch.distributed.fsdp.fully_shard`, which shards parameters and
        leaves buffers whole) gives each rank 1/N of every tensor and all-gathers them per layer for compute. The
        forward, `weight` and the state_dict keys stay the same; idempotent. Returns self."""
        if not self._storage_params:
            self._storage_params = True
            self._set_weight(self.weight)
        return self

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        cdt = self.compute_dtype or w.dtype
        xc = x if x.dtype == cdt else x.to(cdt)
        bias = self.bias
        if bias is not None and bias.dtype != cdt:
            bias = bias.to(cdt)
        y = nf4_linear(xc, w, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={w.blocksize}, double_quant={w.double_quant}, dtype={w.dtype}")

    # ---- HF bnb-4bit state dict ----------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sd = self.weight.to_bnb_state_dict(prefix)  # same key order as bnb: weight, bias, weight.*
        destination[prefix + "weight"] = sd.pop(prefix + "weight")
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias (and the storage, when shardable)
        for name in _BUFFERS:
            destination.pop(prefix + name, None)
        for k, v in sd.items():
            destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[:] = [k for k in missing_keys if k not in {prefix + n for n in _BUFFERS}]
        if not ours:
            missing_keys.append(prefix + "weight")
            return
        try:
            w = _nf4.NF4Weight.from_bnb_state_dict(state_dict, prefix, device=self._nf4_packed.device)
        except (KeyError, ValueError, TypeError) as e:
            error_msgs.append(f"{prefix}weight: {e}")
            return
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: expected shape [{self.out_features}, {self.in_features}], "
                              f"got {list(w.shape)}")
            return
        expected = set(w.to_bnb_state_dict(prefix))
        unexpected_keys.extend(k for k in ours if k not in expected)
        self._set_weight(w)
