"""Fused RMSNorm: torch.ops.lorart.rms_norm (CPU and CUDA, fake kernels, autograd).

    y = weight * (x * rstd),   rstd = 1 / sqrt(mean(x^2, -1) + eps)

in transformers' LlamaRMSNorm arithmetic (x widened to fp32; the normalised row rounded to x's dtype before the
weight multiplies it). Backward keeps x and the per-row rstd only: the plain path also keeps the widened row
and the normalised row (for 16-bit x: 2 + 1 more copies of x's size per norm). Math:
cpp/include/lorart/detail/norm_math.h.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _autocast as _ac
from ._common import _C, FLOAT_DTYPES, check_device, check_dtype, check_same_device, stream

_DTYPES = FLOAT_DTYPES + (torch.float64,)
MAX_HIDDEN_CUDA = int(_C.rms_norm_max_hidden())


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x: Tensor, weight: Tensor, eps: float) -> None:
    check_dtype(x, "x", _DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"lorart: rms_norm: argument `x`: expected [..., hidden] with hidden >= 1, got {list(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"lorart: rms_norm: argument `weight`: expected dtype {x.dtype} (as `x`), got {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"lorart: rms_norm: argument `weight`: expected [{x.shape[-1]}], got {list(weight.shape)}")
    if not eps >= 0.0:
        raise ValueError(f"lorart: rms_norm: argument `eps`: expected >= 0, got {eps}")
    check_same_device(("x", x), ("weight", weight))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _impl(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    x2 = _rows(x)
    out = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=_stat_dtype(x), device=x.device)
    _C.rms_norm(x2, weight.contiguous(), float(eps), out, rstd, stream(x2))
    return out.view(x.shape), rstd


def _backward_impl(x: Tensor, weight: Tensor, rstd: Tensor, grad_out: Tensor, want_w: bool):
    x2 = _rows(x)
    go = _rows(grad_out.to(x.dtype))
    dx = torch.empty_like(x2)
    dw = torch.empty(x2.shape[1], dtype=_stat_dtype(x), device=x.device) if want_w else None
    _C.rms_norm_backward(x2, weight.contiguous(), rstd, go, dx,
                         None if dw is None else dw, stream(x2))
    return dx.view(x.shape), (None if dw is None else dw.to(weight.dtype))


@torch.library.custom_op("lorart::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check(x, weight, eps)
    check_device(x, "x")
    return _impl(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty(x.numel() // x.shape[-1], dtype=_stat_dtype(x))


@torch.library.custom_op("lorart::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(x: Tensor, weight: Tensor, rstd: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    _check(x, weight, 0.0)
    check_device(x, "x")
    return _backward_impl(x, weight, rstd, grad_out, True)


@_rms_norm_backward_op.register_fake
def _(x, weight, rstd, grad_out):
    _check(x, weight, 0.0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.lorart.rms_norm_backward(x, weight, rstd, grad_out)
    return dx, dw, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup)
_AUTOCAST = _ac.Promote(0, 1)  # x, weight: LlamaRMSNorm's `weight * h.to(x.dtype)` promotes
_ac.register("rms_norm", _AUTOCAST)
_ac.register("rms_norm_backward", _ac.Keep())


class _RMSNormFn(torch.autograd.Function):
    """The eager path: the same kernels without the dispatcher's Python layers."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _impl(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward_impl(x, weight, rstd, grad_out, ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) in LlamaRMSNorm's arithmetic (see the module docstring)."""
    if torch.compiler.is_compiling():
        return torch.ops.lorart.rms_norm(x, weight, float(eps))[0]
    dev = _ac.device_on(x)
    if dev is not None:
        x, weight, eps = _AUTOCAST.cast((x, weight, eps), dev)
    _check(x, weight, eps)
    check_device(x, "x")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormFn.apply(x, weight, float(eps))
    return _impl(x, weight, eps)[0]


__all__ = ["rms_norm", "MAX_HIDDEN_CUDA"]
