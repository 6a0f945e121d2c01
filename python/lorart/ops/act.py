"""Fused activations: torch.ops.lorart.swiglu (CPU and CUDA, fake kernels, autograd).

    swiglu(gate, up) = silu(gate) * up                silu(g) = g / (1 + exp(-g))

The gated MLP activation of Llama-family models in one pass (computed in fp32, or fp64 for fp64 inputs, and
rounded once). Backward saves only ``gate`` and ``up``: the plain ``F.silu(gate) * up`` also keeps
``silu(gate)``, one more [tokens, intermediate] tensor per layer. Math: cpp/include/lorart/detail/act_math.h.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _autocast as ac
from ._common import _C, FLOAT_DTYPES, check_dtype, check_same_device, stream
from ._define import Op, randn

_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check(gate: Tensor, up: Tensor, *_) -> None:
    check_dtype(gate, "gate", _DTYPES)
    if up.dtype != gate.dtype:
        raise TypeError(f"lorart: swiglu: argument `up`: expected dtype {gate.dtype} (as `gate`), got {up.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"lorart: swiglu: argument `up`: expected shape {list(gate.shape)} (as `gate`), got "
                         f"{list(up.shape)}")
    check_same_device(("gate", gate), ("up", up))


def _new(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _forward(gate: Tensor, up: Tensor) -> Tensor:
    g, u = gate.contiguous(), up.contiguous()
    out = _new(g)
    _C.swiglu(g, u, out, stream(out))
    return out


def _backward_op(gate: Tensor, up: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    g, u, go = gate.contiguous(), up.contiguous(), grad_out.contiguous().to(gate.dtype)
    dg, du = _new(g), _new(g)
    _C.swiglu_backward(g, u, go, dg, du, stream(g))
    return dg, du


def _setup(ctx, args, out):
    ctx.save_for_backward(*args)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return swiglu_backward.run(ctx, gate, up, grad_out)


def _samples(device, dtype, backward=False):
    if dtype == torch.float64 and torch.device(device).type != "cpu":
        return []
    t = lambda seed, *s: randn(seed, *s, dtype=dtype, device=device, scale=4.0)  # noqa: E731
    shapes = ((5, 33), (2, 3, 8), (1,), (0, 4))
    return [(t(i, *s), t(i + 10, *s)) + ((t(i + 20, *s),) if backward else ()) for i, s in enumerate(shapes)]


swiglu = Op("swiglu", _forward, check=_check, fake=lambda gate, up: _new(gate), setup=_setup, backward=_backward,
            diff=("gate", "up"), autocast=ac.Promote("gate", "up"),  # `F.silu(gate) * up` promotes
            samples=_samples)
"""silu(gate) * up in one pass; gradients to both (see the module docstring)."""
swiglu_backward = Op("swiglu_backward", _backward_op, check=_check,
                     fake=lambda gate, up, grad_out: (_new(gate), _new(gate)),
                     samples=lambda device, dtype: _samples(device, dtype, backward=True))

__all__ = ["swiglu", "swiglu_backward"]
