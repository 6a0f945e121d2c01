"""Fused activations: torch.ops.lorart.swiglu (CPU and CUDA, fake kernels, autograd).

    swiglu(gate, up) = silu(gate) * up                silu(g) = g / (1 + exp(-g))

The gated MLP activation of Llama-family models in one pass (computed in fp32, or fp64 for fp64 inputs, and
rounded once). Backward saves only ``gate`` and ``up``: the plain ``F.silu(gate) * up`` also keeps
``silu(gate)``, one more [tokens, intermediate] tensor per layer. Math: cpp/include/lorart/detail/act_math.h.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _autocast as _ac
from ._common import _C, FLOAT_DTYPES, check_device, check_dtype, check_same_device, stream

_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check(gate: Tensor, up: Tensor) -> None:
    check_dtype(gate, "gate", _DTYPES)
    if up.dtype != gate.dtype:
        raise TypeError(f"lorart: swiglu: argument `up`: expected dtype {gate.dtype} (as `gate`), got {up.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"lorart: swiglu: argument `up`: expected shape {list(gate.shape)} (as `gate`), got "
                         f"{list(up.shape)}")
    check_same_device(("gate", gate), ("up", up))


def _impl(gate: Tensor, up: Tensor) -> Tensor:
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    _C.swiglu(g, u, out, stream(out))
    return out


def _backward_impl(gate: Tensor, up: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    g, u, go = gate.contiguous(), up.contiguous(), grad_out.contiguous().to(gate.dtype)
    dg = torch.empty_like(g, memory_format=torch.contiguous_format)
    du = torch.empty_like(g, memory_format=torch.contiguous_format)
    _C.swiglu_backward(g, u, go, dg, du, stream(g))
    return dg, du


@torch.library.custom_op("lorart::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, up)
    check_device(gate, "gate")
    return _impl(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    _check(gate, up)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("lorart::swiglu_backward", mutates_args=())
def _swiglu_backward_op(gate: Tensor, up: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    _check(gate, up)
    check_device(gate, "gate")
    return _backward_impl(gate, up, grad_out)


@_swiglu_backward_op.register_fake
def _(gate, up, grad_out):
    _check(gate, up)
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return torch.ops.lorart.swiglu_backward(gate, up, grad_out)


_swiglu_op.register_autograd(_backward, setup_context=_setup)
_AUTOCAST = _ac.Promote(0, 1)  # gate, up: `F.silu(gate) * up` promotes
_ac.register("swiglu", _AUTOCAST)
_ac.register("swiglu_backward", _ac.Keep())


class _SwiGLUFn(torch.autograd.Function):
    """The eager path: the same kernels without the dispatcher's Python layers."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _impl(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        return _backward_impl(gate, up, grad_out)




def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one pass; gradients to both (see the module docstring)."""
    if torch.compiler.is_compiling():
        return torch.ops.lorart.swiglu(gate, up)
    dev = _ac.device_on(gate)
    if dev is not None:
        gate, up = _AUTOCAST.cast((gate, up), dev)
    _check(gate, up)
    check_device(gate, "gate")
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUFn.apply(gate, up)
    return _impl(gate, up)


__all__ = ["swiglu"]
