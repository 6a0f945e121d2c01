"""LoRA ops: torch.ops.lorart.lora_* (CPU and CUDA, fake kernels, autograd).

    y = x @ W.T + bias + scale * dropout(x) @ A.T @ B.T      (scale = alpha / r, or alpha / sqrt(r))

- ``lora_linear`` (dense W) and ``lora_linear_nf4`` (bitsandbytes NF4 W, the NF4 contract's op_args) return
  ``(y, xa)`` with ``xa = dropout(x) @ A.T`` (the small [M, r] product saved for backward); use the wrappers
  :func:`lora_linear` / :func:`lora_linear_nf4`, which return ``y``. ``B @ A`` is never formed; the LoRA term
  is added into the base output in place; backward saves ``x`` and ``xa`` (never a dequantised NF4 weight,
  never a dropout mask: it is recomputed from ``seed``) and gives dx, dA, dB and dbias, never dW.
- Rows <= 16 (decode) take the fused C++/CUDA kernel (one pass over W, dense or NF4-packed); more rows take
  torch matmuls with the LoRA term folded into the output (``addmm_``).
- ``lora_dropout``: the counter-based mask shared by CPU and CUDA (bit-identical, recomputable).
- ``lora_grouped_add_``: mixed-adapter batches (Punica BGMV); ``lora_merge_`` / ``lora_unmerge_``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import nf4 as _nf4ops
from ._common import _C, FLOAT_DTYPES, check_device, check_dtype, check_same_device, stream, view

FUSED_MAX_ROWS = int(_C.lora_fused_max_rows())
_DTYPES = FLOAT_DTYPES + (torch.float64,)

# "auto": the fused kernel for <= FUSED_MAX_ROWS rows on CUDA. On the CPU the base runs on torch's GEMM (dense)
# or lorart.ops.nf4's SIMD GEMV (NF4) with the LoRA term added in place: both beat the portable C++ fused loop,
# which stays as the CPU reference of the CUDA kernel. "always" / "never" force a path (tests exercise both).
_policy = {"fused": "auto"}


def set_fused_policy(mode: str) -> str:
    """Set when the fused small-M kernel runs: "auto" | "always" (when rows <= 16) | "never". Returns the old."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"lorart: set_fused_policy: expected 'auto', 'always' or 'never', got {mode!r}")
    old, _policy["fused"] = _policy["fused"], mode
    return old


def _use_fused(x2: Tensor, nf4: bool) -> bool:
    mode = _policy["fused"]
    if mode == "never" or x2.shape[0] > FUSED_MAX_ROWS or x2.shape[0] == 0:
        return False
    if x2.dtype == torch.float64 and (nf4 or x2.is_cuda):
        return False
    return mode == "always" or x2.is_cuda


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _check_p(p: float) -> None:
    if not (0.0 <= p < 1.0):
        raise ValueError(f"lorart: argument `dropout`: expected a probability in [0, 1), got {p}")


def _check_lora(x: Tensor, N: int, K: int, bias, A: Tensor, B: Tensor, p: float) -> None:
    check_dtype(x, "x", _DTYPES)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"lorart: argument `x`: expected [..., {K}] (in_features), got {list(x.shape)}")
    for name, t in (("A", A), ("B", B), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"lorart: argument `{name}`: expected dtype {x.dtype} (as `x`), got {t.dtype}")
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"lorart: argument `A`: expected [r, {K}], got {list(A.shape)}")
    if B.dim() != 2 or B.shape != (N, A.shape[0]):
        raise ValueError(f"lorart: argument `B`: expected [{N}, {A.shape[0]}] ([out_features, r]), got {list(B.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"lorart: argument `bias`: expected [{N}], got {list(bias.shape)}")
    check_same_device(("x", x), ("A", A), ("B", B), ("bias", bias))
    _check_p(p)


# ---- dropout -------------------------------------------------------------------------------------------------

@torch.library.custom_op("lorart::lora_dropout", mutates_args=())
def lora_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """dropout(x) with the counter-based mask of (seed, row * K + col) over x viewed as [-1, K]."""
    check_dtype(x, "x", _DTYPES)
    _check_p(p)
    check_device(x, "x")
    x2 = _rows(x)
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    _C.lora_dropout(view(x2), view(out), p, seed & 0xFFFFFFFFFFFFFFFF, stream(out))
    return out.view(x.shape)


@lora_dropout.register_fake
def _(x, p, seed):
    check_dtype(x, "x", _DTYPES)
    _check_p(p)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup(ctx, inputs, output):
    ctx.p, ctx.seed = inputs[1], inputs[2]


def _dropout_backward(ctx, grad):
    return torch.ops.lorart.lora_dropout(grad, ctx.p, ctx.seed), None, None


lora_dropout.register_autograd(_dropout_backward, setup_context=_dropout_setup)


def _drop(x2: Tensor, p: float, seed: int) -> Tensor:
    return x2 if p == 0.0 else torch.ops.lorart.lora_dropout(x2, p, seed)


def _drop_raw(x2: Tensor, p: float, seed: int) -> Tensor:
    """dropout for use inside an op's real implementation (no second trip through the dispatcher)."""
    if p == 0.0:
        return x2
    out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    _C.lora_dropout(view(x2), view(out), p, seed & 0xFFFFFFFFFFFFFFFF, stream(out))
    return out


# ---- the LoRA linear -----------------------------------------------------------------------------------------

def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _lora_tail(x2: Tensor, y: Tensor, A: Tensor, B: Tensor, scale: float, p: float, seed: int) -> Tensor:
    """The unfused LoRA path on a base output y [M, N]: y += scale * (dropout(x) @ A.T) @ B.T, in place."""
    xa = _drop_raw(x2, p, seed) @ A.t()
    y.addmm_(xa, B.t(), alpha=scale)
    return xa


def _check_dense(x, weight, bias, A, B, dropout) -> None:
    if weight.dim() != 2:
        raise ValueError(f"lorart: argument `weight`: expected [out_features, in_features], got {list(weight.shape)}")
    N, K = weight.shape
    _check_lora(x, N, K, bias, A, B, dropout)
    if weight.dtype != x.dtype:
        raise TypeError(f"lorart: argument `weight`: expected dtype {x.dtype} (as `x`), got {weight.dtype}")
    check_same_device(("x", x), ("weight", weight))
    check_device(x, "x")


@torch.library.custom_op("lorart::lora_linear", mutates_args=())
def _lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                 dropout: float, seed: int) -> tuple[Tensor, Tensor]:
    _check_dense(x, weight, bias, A, B, dropout)
    return _dense_impl(x, weight, bias, A, B, scale, dropout, seed)


def _dense_impl(x, weight, bias, A, B, scale, dropout, seed):
    N = weight.shape[0]
    x2 = _rows(x)
    seed &= 0xFFFFFFFFFFFFFFFF
    if _use_fused(x2, nf4=False):
        xa = torch.empty(x2.shape[0], A.shape[0], dtype=_acc_dtype(x), device=x.device)
        _C.lora_shrink(view(x2), view(A.contiguous()), dropout, seed, view(xa), stream(x))
        y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
        _C.lora_fused_linear(view(x2), view(weight.contiguous()), None if bias is None else view(bias.contiguous()),
                             view(xa), view(B.contiguous()), scale, view(y), stream(x))
        xa = xa.to(x.dtype)
    else:
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        xa = _lora_tail(x2, y, A, B, scale, dropout, seed)
    return y.view(*x.shape[:-1], N), xa


@_lora_linear.register_fake
def _(x, weight, bias, A, B, scale, dropout, seed):
    N, K = weight.shape
    _check_lora(x, N, K, bias, A, B, dropout)
    M = x.numel() // K if K else 0
    return x.new_empty(*x.shape[:-1], N), x.new_empty(M, A.shape[0])




def _check_nf4(x, packed, absmax, rows, cols):
    if x.dtype == torch.float64:
        raise TypeError("lorart: argument `x`: an NF4 base computes in float32|bfloat16|float16, got float64")
    check_dtype(packed, "packed", (torch.uint8,))
    check_dtype(absmax, "absmax", (torch.float32, torch.uint8))
    if packed.numel() != (rows * cols + 1) // 2:
        raise ValueError(f"lorart: argument `packed`: expected {(rows * cols + 1) // 2} bytes for a [{rows}, {cols}] "
                         f"NF4 weight, got {packed.numel()}")


@torch.library.custom_op("lorart::lora_linear_nf4", mutates_args=())
def _lora_linear_nf4(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
                     nested_code: Tensor | None, offset: float, blocksize: int, rows: int, cols: int,
                     bias: Tensor | None, A: Tensor, B: Tensor, scale: float, dropout: float,
                     seed: int) -> tuple[Tensor, Tensor]:
    _check_nf4_all(x, packed, absmax, rows, cols, bias, A, B, dropout)
    return _nf4_impl(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias, A, B, scale,
                     dropout, seed)


def _check_nf4_all(x, packed, absmax, rows, cols, bias, A, B, dropout):
    _check_lora(x, rows, cols, bias, A, B, dropout)
    _check_nf4(x, packed, absmax, rows, cols)
    check_same_device(("x", x), ("packed", packed), ("absmax", absmax))
    check_device(x, "x")


def _nf4_impl(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias, A, B, scale,
              dropout, seed):
    x2 = _rows(x)
    seed &= 0xFFFFFFFFFFFFFFFF
    if _use_fused(x2, nf4=True):
        xa = torch.empty(x2.shape[0], A.shape[0], dtype=torch.float32, device=x.device)
        _C.lora_shrink(view(x2), view(A.contiguous()), dropout, seed, view(xa), stream(x))
        y = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
        opt = lambda t: None if t is None else view(t.contiguous())  # noqa: E731
        _C.lora_fused_linear_nf4(view(x2), view(packed.contiguous()), view(absmax.contiguous()), opt(nested_absmax),
                                 opt(nested_code), float(offset), blocksize, rows, cols, opt(bias), view(xa),
                                 view(B.contiguous()), scale, view(y), stream(x))
        xa = xa.to(x.dtype)
    else:  # lorart.ops.nf4's path: dequantised into a reused workspace, never saved for backward
        y = _nf4ops._linear_impl(x2, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias)
        xa = _lora_tail(x2, y, A, B, scale, dropout, seed)
    return y.view(*x.shape[:-1], rows), xa


@_lora_linear_nf4.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias, A, B, scale, dropout, seed):
    _check_lora(x, rows, cols, bias, A, B, dropout)
    _check_nf4(x, packed, absmax, rows, cols)
    M = x.numel() // cols if cols else 0
    return x.new_empty(*x.shape[:-1], rows), x.new_empty(M, A.shape[0])


def _lora_backward(ctx, gy, gxa, W: Tensor | None, base_grad_input=None, drop=_drop):
    x, A, B, xa = ctx.lora_saved
    x2 = _rows(x)
    gy2 = gy.reshape(-1, gy.shape[-1])
    s, p, seed = ctx.scale, ctx.p, ctx.seed
    need_x, need_bias, need_A, need_B = ctx.lora_needs
    g_xa = torch.mm(gy2, B) if s == 1.0 else torch.mm(gy2, B).mul_(s)
    if gxa is not None:
        g_xa = g_xa + gxa
    dx = dA = dB = dbias = None
    if need_B:
        dB = torch.mm(gy2.t(), xa)
        if s != 1.0:
            dB.mul_(s)
    if need_A:
        dA = torch.mm(g_xa.t(), drop(x2, p, seed))
    if need_x:
        dx = torch.mm(gy2, W) if W is not None else base_grad_input(gy2)
        if p == 0.0:
            dx.addmm_(g_xa, A)
        else:
            dx.add_(drop(torch.mm(g_xa, A), p, seed))
        dx = dx.view(x.shape)
    if need_bias:
        dbias = gy2.sum(0)
    return dx, dA, dB, dbias


def _setup_common(ctx, x, bias, A, B, scale, dropout, seed, xa):
    ctx.scale, ctx.p, ctx.seed = float(scale), float(dropout), int(seed)
    return (x, A, B, xa)


def _setup_dense(ctx, inputs, output):
    x, weight, bias, A, B, scale, dropout, seed = inputs
    saved = _setup_common(ctx, x, bias, A, B, scale, dropout, seed, output[1])
    ctx.save_for_backward(*saved, weight)
    ctx.has_bias = bias is not None


def _backward_dense(ctx, gy, gxa):
    x, A, B, xa, weight = ctx.saved_tensors
    ctx.lora_saved = (x, A, B, xa)
    n = ctx.needs_input_grad
    ctx.lora_needs = (n[0], ctx.has_bias and n[2], n[3], n[4])
    dx, dA, dB, dbias = _lora_backward(ctx, gy, gxa, weight)
    return dx, None, dbias, dA, dB, None, None, None


_lora_linear.register_autograd(_backward_dense, setup_context=_setup_dense)


def _setup_nf4(ctx, inputs, output):
    x, packed, absmax, nabs, ncode, offset, blocksize, rows, cols, bias, A, B, scale, dropout, seed = inputs
    saved = _setup_common(ctx, x, bias, A, B, scale, dropout, seed, output[1])
    ctx.nf4_meta = (offset, blocksize, rows, cols, nabs is not None)
    extra = (nabs, ncode) if nabs is not None else ()
    ctx.save_for_backward(*saved, packed, absmax, *extra)
    ctx.has_bias = bias is not None


def _backward_nf4(ctx, gy, gxa):
    x, A, B, xa, packed, absmax, *extra = ctx.saved_tensors
    offset, blocksize, rows, cols, dq = ctx.nf4_meta
    nabs, ncode = extra if dq else (None, None)
    ctx.lora_saved = (x, A, B, xa)
    n = ctx.needs_input_grad
    ctx.lora_needs = (n[0], ctx.has_bias and n[9], n[10], n[11])
    def base_grad_input(gy2):  # dx = gy @ dequant(W4), W4 decoded into lorart.ops.nf4's reused workspace
        return torch.ops.lorart.nf4_linear_grad_input(gy2.contiguous(), packed, absmax, nabs, ncode, offset,
                                                      blocksize, rows, cols)

    dx, dA, dB, dbias = _lora_backward(ctx, gy, gxa, None, base_grad_input)
    return (dx,) + (None,) * 8 + (dbias, dA, dB, None, None, None)


_lora_linear_nf4.register_autograd(_backward_nf4, setup_context=_setup_nf4)


# ---- eager fast path ----------------------------------------------------------------------------------------
# The custom ops above are what torch.compile / export see. In eager mode the wrappers below run the same
# implementations through a torch.autograd.Function, skipping the dispatcher's Python layers (about 4x less
# host time per call, which decides the speed of small LoRA layers).

class _DenseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, dropout, seed):
        y, xa = _dense_impl(x, weight, bias, A, B, scale, dropout, seed)
        ctx.save_for_backward(x, A, B, xa, weight)
        ctx.scale, ctx.p, ctx.seed, ctx.has_bias = float(scale), float(dropout), int(seed), bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, A, B, xa, weight = ctx.saved_tensors
        ctx.lora_saved = (x, A, B, xa)
        n = ctx.needs_input_grad
        ctx.lora_needs = (n[0], ctx.has_bias and n[2], n[3], n[4])
        dx, dA, dB, dbias = _lora_backward(ctx, gy, None, weight, drop=_drop_raw)
        return dx, None, dbias, dA, dB, None, None, None


class _NF4Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, nabs, ncode, offset, blocksize, rows, cols, bias, A, B, scale, dropout, seed):
        y, xa = _nf4_impl(x, packed, absmax, nabs, ncode, offset, blocksize, rows, cols, bias, A, B, scale, dropout,
                          seed)
        ctx.save_for_backward(x, A, B, xa)
        ctx.nf4 = (packed, absmax, nabs, ncode, offset, blocksize, rows, cols)  # frozen buffers, never modified
        ctx.scale, ctx.p, ctx.seed, ctx.has_bias = float(scale), float(dropout), int(seed), bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        ctx.lora_saved = ctx.saved_tensors
        n = ctx.needs_input_grad
        ctx.lora_needs = (n[0], ctx.has_bias and n[9], n[10], n[11])
        packed, absmax, nabs, ncode, offset, blocksize, rows, cols = ctx.nf4

        def base_grad_input(gy2):
            return _nf4ops.nf4_linear_grad_input(gy2.contiguous(), packed, absmax, nabs, ncode, offset, blocksize,
                                                 rows, cols)

        dx, dA, dB, dbias = _lora_backward(ctx, gy, None, None, base_grad_input, drop=_drop_raw)
        return (dx,) + (None,) * 8 + (dbias, dA, dB, None, None, None)


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                dropout: float = 0.0, seed: int = 0) -> Tensor:
    """y = x @ weight.T + bias + scale * dropout(x) @ A.T @ B.T (dense base; see the module docstring)."""
    if _eager():
        _check_dense(x, weight, bias, A, B, dropout)
        return _DenseFn.apply(x, weight, bias, A, B, float(scale), float(dropout), int(seed))
    return torch.ops.lorart.lora_linear(x, weight, bias, A, B, float(scale), float(dropout), int(seed))[0]


def lora_linear_nf4(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
                    nested_code: Tensor | None, offset: float, blocksize: int, rows: int, cols: int,
                    bias: Tensor | None, A: Tensor, B: Tensor, scale: float, dropout: float = 0.0,
                    seed: int = 0) -> Tensor:
    """The same with an NF4 base given as ``*NF4Weight.op_args()``."""
    args = (x, packed, absmax, nested_absmax, nested_code, float(offset), int(blocksize), int(rows), int(cols), bias,
            A, B, float(scale), float(dropout), int(seed))
    if _eager():
        _check_nf4_all(x, packed, absmax, rows, cols, bias, A, B, dropout)
        return _NF4Fn.apply(*args)
    return torch.ops.lorart.lora_linear_nf4(*args)[0]


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ValueError(f"lorart: argument `r`: expected a positive rank, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


from .lora_extra import lora_grouped_add_, lora_merge_, lora_merge_nonfinite, lora_unmerge_  # noqa: E402

__all__ = ["lora_linear", "lora_linear_nf4", "lora_dropout", "lora_grouped_add_", "lora_merge_", "lora_unmerge_",
           "lora_merge_nonfinite", "lora_scale", "set_fused_policy", "FUSED_MAX_ROWS"]
