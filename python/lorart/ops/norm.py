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

from . import _autocast as ac
from ._common import _C, FLOAT_DTYPES, check_dtype, check_same_device, stream
from ._define import Op, randn

_DTYPES = FLOAT_DTYPES + (torch.float64,)
MAX_HIDDEN_CUDA = int(_C.rms_norm_max_hidden())


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_xw(x: Tensor, weight: Tensor) -> None:
    check_dtype(x, "x", _DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"lorart: rms_norm: argument `x`: expected [..., hidden] with hidden >= 1, got {list(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"lorart: rms_norm: argument `weight`: expected dtype {x.dtype} (as `x`), got {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"lorart: rms_norm: argument `weight`: expected [{x.shape[-1]}], got {list(weight.shape)}")
    check_same_device(("x", x), ("weight", weight))


def _check(x: Tensor, weight: Tensor, eps: float) -> None:
    _check_xw(x, weight)
    if not eps >= 0.0:
        raise ValueError(f"lorart: rms_norm: argument `eps`: expected >= 0, got {eps}")


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    x2 = _rows(x)
    out = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=_stat_dtype(x), device=x.device)
    _C.rms_norm(x2, weight.contiguous(), float(eps), out, rstd, stream(x2))
    return out.view(x.shape), rstd


def _backward_into(x: Tensor, weight: Tensor, rstd: Tensor, grad_out: Tensor, want_w: bool):
    x2 = _rows(x)
    go = _rows(grad_out.to(x.dtype))
    dx = torch.empty_like(x2)
    dw = torch.empty(x2.shape[1], dtype=_stat_dtype(x), device=x.device) if want_w else None
    _C.rms_norm_backward(x2, weight.contiguous(), rstd, go, dx, dw, stream(x2))
    return dx.view(x.shape), (None if dw is None else dw.to(weight.dtype))


def _backward_op(x: Tensor, weight: Tensor, rstd: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    return _backward_into(x, weight, rstd, grad_out, True)


def _setup(ctx, args, out):
    x, weight, _ = args
    ctx.save_for_backward(x, weight, out[1])


def _backward(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if ctx.eager:  # the kernels directly; the weight gradient only when wanted
        dx, dw = _backward_into(x, weight, rstd, grad_out, ctx.needs[1])
    else:
        dx, dw = rms_norm_backward.dispatch(x, weight, rstd, grad_out)
    return (dx if ctx.needs[0] else None), (dw if ctx.needs[1] else None), None


def _samples(device, dtype, backward=False):
    if dtype == torch.float64 and torch.device(device).type != "cpu":
        return []
    out = []
    for seed, shape in ((0, (6, 40)), (1, (2, 3, 17)), (2, (1, 1)), (3, (0, 8))):
        x = randn(seed, *shape, dtype=dtype, device=device, scale=3.0)
        w = randn(seed + 10, shape[-1], dtype=dtype, device=device)
        if backward:
            out.append((x, w, _forward(x, w, 1e-5)[1], randn(seed + 20, *shape, dtype=dtype, device=device)))
        else:
            out.append((x, w, 1e-5 if seed else 0.0))
    return out


rms_norm_op = Op("rms_norm", _forward, check=_check,
                 fake=lambda x, weight, eps: (torch.empty_like(x, memory_format=torch.contiguous_format),
                                              x.new_empty(x.numel() // x.shape[-1], dtype=_stat_dtype(x))),
                 setup=_setup, backward=_backward, diff=("x", "weight"), nondiff_outputs=(1,),
                 autocast=ac.Promote("x", "weight"),  # LlamaRMSNorm's `weight * h.to(x.dtype)` promotes
                 samples=_samples)
rms_norm_backward = Op("rms_norm_backward", _backward_op,
                       check=lambda x, weight, rstd, grad_out: _check_xw(x, weight),
                       fake=lambda x, weight, rstd, grad_out: (
                           torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)),
                       samples=lambda device, dtype: _samples(device, dtype, backward=True))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) in LlamaRMSNorm's arithmetic (see the module docstring)."""
    return rms_norm_op.first(x, weight, float(eps))


__all__ = ["rms_norm", "rms_norm_op", "rms_norm_backward", "MAX_HIDDEN_CUDA"]
