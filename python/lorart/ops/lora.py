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

from . import _autocast as _ac
from . import nf4 as _nf4ops
from ._common import _C, FLOAT_DTYPES, check_device, check_dtype, check_same_device, stream

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
    if mode == "never" or (mode == "auto" and not x2.is_cuda) or x2.shape[0] > FUSED_MAX_ROWS or x2.shape[0] == 0:
        return False
    if x2.dtype == torch.float64 and (nf4 or x2.is_cuda):
        return False
    return mode == "always" or x2.is_cuda


def _rows(x: Tensor) -> Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _unrows(y2: Tensor, x: Tensor, N: int) -> Tensor:
    """y2 [M, N] viewed with x's leading dimensions."""
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], N)


def _check_p(p: float) -> None:
    if not (0.0 <= p < 1.0):
        raise ValueError(f"lorart: argument `dropout`: expected a probability in [0, 1), got {p}")


def _check_lora(x: Tensor, N: int, K: int, bias, A: Tensor, B: Tensor, p: float) -> None:
    """The argument checks of the LoRA ops. The passing case is one chain of comparisons; when it fails,
    _check_lora_full raises the error of the first argument that is wrong."""
    dt, xs, As = x.dtype, x.shape, A.shape
    if (dt in _DTYPES and xs and xs[-1] == K and A.dtype == dt and B.dtype == dt and len(As) == 2 and As[1] == K
            and B.shape == (N, As[0]) and (bias is None or (bias.dtype == dt and bias.shape == (N,)))
            and 0.0 <= p < 1.0):
        dev = x.device
        if A.device == dev and B.device == dev and (bias is None or bias.device == dev):
            return
    _check_lora_full(x, N, K, bias, A, B, p)


def _check_lora_full(x: Tensor, N: int, K: int, bias, A: Tensor, B: Tensor, p: float) -> None:
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
    _C.lora_dropout(x2, out, p, seed & 0xFFFFFFFFFFFFFFFF, stream(out))
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
_ac.register("lora_dropout", _ac.Keep())


def _drop(x2: Tensor, p: float, seed: int) -> Tensor:
    return x2 if p == 0.0 else torch.ops.lorart.lora_dropout(x2, p, seed)


def _drop_raw(x2: Tensor, p: float, seed: int) -> Tensor:
    """dropout for use inside an op's real implementation (no second trip through the dispatcher)."""
    if p == 0.0:
        return x2
    out = torch.empty_like(x2)  # x2's strides when dense, else contiguous: unit stride along K either way
    _C.lora_dropout(x2, out, p, seed & 0xFFFFFFFFFFFFFFFF, stream(out))
    return out


def _drop_raw_(t: Tensor, p: float, seed: int) -> Tensor:
    """_drop_raw in place on a fresh [M, K] tensor (the kernels are elementwise: out may alias x)."""
    if p != 0.0:
        _C.lora_dropout(t, t, p, seed & 0xFFFFFFFFFFFFFFFF, stream(t))
    return t


# ---- the LoRA linear -----------------------------------------------------------------------------------------

_linear = torch.nn.functional.linear  # for 2-d x: addmm(bias, x, W.t()) / mm(x, W.t()), one call from Python


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _lora_tail(x2: Tensor, y: Tensor, A: Tensor, B: Tensor, scale: float, p: float, seed: int) -> Tensor:
    """The unfused LoRA path on a base output y [M, N]: y += scale * (dropout(x) @ A.T) @ B.T, in place."""
    xa = _linear(_drop_raw(x2, p, seed), A)
    y.addmm_(xa, B.t(), alpha=scale)
    return xa


def _check_dense(x, weight, bias, A, B, dropout) -> None:
    ws = weight.shape
    if len(ws) == 2:
        _check_lora(x, ws[0], ws[1], bias, A, B, dropout)
        dev = x.device
        if weight.dtype == x.dtype and weight.device == dev:
            if dev.type != "cpu":
                check_device(x, "x")
            return
    _check_dense_full(x, weight, bias, A, B, dropout)


def _check_dense_full(x, weight, bias, A, B, dropout) -> None:
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
        _C.lora_shrink(x2, A.contiguous(), dropout, seed, xa, stream(x))
        y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
        _C.lora_fused_linear(x2, weight.contiguous(), None if bias is None else bias.contiguous(),
                             xa, B.contiguous(), scale, y, stream(x))
        xa = xa.to(x.dtype)
    else:
        y = _linear(x2, weight, bias)
        xa = _lora_tail(x2, y, A, B, scale, dropout, seed)
    return _unrows(y, x, N), xa


@_lora_linear.register_fake
def _(x, weight, bias, A, B, scale, dropout, seed):
    N, K = weight.shape
    _check_lora(x, N, K, bias, A, B, dropout)
    M = x.numel() // K if K else 0
    return x.new_empty(*x.shape[:-1], N), x.new_empty(M, A.shape[0])




_ABSMAX_DTYPES = (torch.float32, torch.uint8)


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
    dev = x.device
    if (x.dtype != torch.float64 and packed.dtype == torch.uint8 and absmax.dtype in _ABSMAX_DTYPES
            and packed.numel() == (rows * cols + 1) // 2 and packed.device == dev and absmax.device == dev):
        if dev.type != "cpu":
            check_device(x, "x")
        return
    _check_nf4_all_full(x, packed, absmax, rows, cols, bias, A, B, dropout)


def _check_nf4_all_full(x, packed, absmax, rows, cols, bias, A, B, dropout):
    _check_lora_full(x, rows, cols, bias, A, B, dropout)
    _check_nf4(x, packed, absmax, rows, cols)
    check_same_device(("x", x), ("packed", packed), ("absmax", absmax))
    check_device(x, "x")


def _nf4_impl(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias, A, B, scale,
              dropout, seed):
    x2 = _rows(x)
    seed &= 0xFFFFFFFFFFFFFFFF
    if _use_fused(x2, nf4=True):
        xa = torch.empty(x2.shape[0], A.shape[0], dtype=torch.float32, device=x.device)
        _C.lora_shrink(x2, A.contiguous(), dropout, seed, xa, stream(x))
        y = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
        opt = lambda t: None if t is None else t.contiguous()  # noqa: E731
        _C.lora_fused_linear_nf4(x2, packed.contiguous(), absmax.contiguous(), opt(nested_absmax),
                                 opt(nested_code), float(offset), blocksize, rows, cols, opt(bias), xa,
                                 B.contiguous(), scale, y, stream(x))
        xa = xa.to(x.dtype)
    else:  # lorart.ops.nf4's path: dequantised into a reused workspace, never saved for backward
        y = _nf4ops._linear_impl(x2, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias)
        xa = _lora_tail(x2, y, A, B, scale, dropout, seed)
    return _unrows(y, x, rows), xa


@_lora_linear_nf4.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias, A, B, scale, dropout, seed):
    _check_lora(x, rows, cols, bias, A, B, dropout)
    _check_nf4(x, packed, absmax, rows, cols)
    M = x.numel() // cols if cols else 0
    return x.new_empty(*x.shape[:-1], rows), x.new_empty(M, A.shape[0])


def _lora_backward(gy, gxa, saved, needs, s: float, p: float, seed: int, W: Tensor | None, base_grad_input=None,
                   drop=_drop, drop_=None):
    """dx, dA, dB, dbias. The scale rides in the matmuls (alpha=s; beta=0 ignores the placeholder input, which
    only gives the shape). `drop_` (eager path): dropout in place on a fresh tensor."""
    x, A, B, xa = saved
    gy2 = gy if gy.dim() == 2 else gy.reshape(-1, gy.shape[-1])
    need_x, need_bias, need_A, need_B = needs
    dx = dA = dB = dbias = None
    if need_A or need_x:
        g_xa = torch.addmm(xa, gy2, B, beta=0, alpha=s) if gxa is None else torch.addmm(gxa, gy2, B, alpha=s)
    if need_B:
        dB = torch.addmm(B, gy2.t(), xa, beta=0, alpha=s)
    if need_A:
        dA = torch.mm(g_xa.t(), drop(_rows(x), p, seed))
    if need_x:
        if p == 0.0:
            dx = torch.mm(gy2, W) if W is not None else base_grad_input(gy2)
            dx.addmm_(g_xa, A)
        else:
            t = torch.mm(g_xa, A)
            t = drop(t, p, seed) if drop_ is None else drop_(t, p, seed)
            dx = torch.addmm(t, gy2, W) if W is not None else base_grad_input(gy2).add_(t)
        dx = dx if x.dim() == 2 else dx.view(x.shape)
    if need_bias:
        dbias = gy2.sum(0)
    return dx, dA, dB, dbias


def _setup_common(ctx, x, bias, A, B, scale, dropout, seed, xa):
    ctx.scale, ctx.p, ctx.seed = float(scale), float(dropout), int(seed)
    return (x, A, B, xa)


def _run_backward(ctx, gy, gxa, saved, needs, W, base_grad_input=None, drop=_drop, drop_=None):
    return _lora_backward(gy, gxa, saved, needs, ctx.scale, ctx.p, ctx.seed, W, base_grad_input, drop, drop_)


def _setup_dense(ctx, inputs, output):
    x, weight, bias, A, B, scale, dropout, seed = inputs
    saved = _setup_common(ctx, x, bias, A, B, scale, dropout, seed, output[1])
    ctx.save_for_backward(*saved, weight)
    ctx.has_bias = bias is not None


def _backward_dense(ctx, gy, gxa):
    x, A, B, xa, weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    dx, dA, dB, dbias = _run_backward(ctx, gy, gxa, (x, A, B, xa), (n[0], ctx.has_bias and n[2], n[3], n[4]), weight)
    return dx, None, dbias, dA, dB, None, None, None


_lora_linear.register_autograd(_backward_dense, setup_context=_setup_dense)
_DENSE_AUTOCAST = _ac.Lower(0, 1, 2, 3, 4)  # x, weight, bias, A, B: as F.linear under autocast
_ac.register("lora_linear", _DENSE_AUTOCAST)


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
    n = ctx.needs_input_grad

    def base_grad_input(gy2):  # dx = gy @ dequant(W4), W4 decoded into lorart.ops.nf4's reused workspace
        return torch.ops.lorart.nf4_linear_grad_input(gy2.contiguous(), packed, absmax, nabs, ncode, offset,
                                                      blocksize, rows, cols)

    dx, dA, dB, dbias = _run_backward(ctx, gy, gxa, (x, A, B, xa), (n[0], ctx.has_bias and n[9], n[10], n[11]), None,
                                      base_grad_input)
    return (dx,) + (None,) * 8 + (dbias, dA, dB, None, None, None)


_lora_linear_nf4.register_autograd(_backward_nf4, setup_context=_setup_nf4)
_NF4_AUTOCAST = _ac.Lower(0, 9, 10, 11)  # x, bias, A, B (the NF4 weight computes in x's dtype)
_ac.register("lora_linear_nf4", _NF4_AUTOCAST)


# ---- eager fast path ----------------------------------------------------------------------------------------
# The custom ops above are what torch.compile / export see. In eager mode the wrappers below run the same
# implementations through a torch.autograd.Function, skipping the dispatcher's Python layers (about 4x less
# host time per call, which decides the speed of small LoRA layers), and call them directly when autograd would
# record nothing (no_grad, inference_mode, or no input requiring grad): the same result without a Function.

class _DenseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, dropout, seed):
        y, xa = _dense_impl(x, weight, bias, A, B, scale, dropout, seed)
        ctx.save_for_backward(x, A, B, xa, weight)
        ctx.scale, ctx.p, ctx.seed, ctx.has_bias = float(scale), float(dropout), int(seed), bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        # once_differentiable's wrapper (no_grad + checks) only matters for create_graph=True: skip it otherwise
        return _dense_backward(ctx, gy) if not torch.is_grad_enabled() else _dense_backward_once(ctx, gy)


def _dense_backward(ctx, gy):
    x, A, B, xa, weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    dx, dA, dB, dbias = _run_backward(ctx, gy, None, (x, A, B, xa), (n[0], ctx.has_bias and n[2], n[3], n[4]),
                                      weight, drop=_drop_raw, drop_=_drop_raw_)
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
    def backward(ctx, gy):
        return _nf4_backward(ctx, gy) if not torch.is_grad_enabled() else _nf4_backward_once(ctx, gy)


def _nf4_backward(ctx, gy):
    n = ctx.needs_input_grad
    packed, absmax, nabs, ncode, offset, blocksize, rows, cols = ctx.nf4

    def base_grad_input(gy2):  # the impl, not the op: no second trip through the dispatcher
        return _nf4ops._grad_input_impl(gy2.contiguous(), packed, absmax, nabs, ncode, offset, blocksize, rows, cols)

    dx, dA, dB, dbias = _run_backward(ctx, gy, None, ctx.saved_tensors, (n[0], ctx.has_bias and n[9], n[10], n[11]),
                                      None, base_grad_input, drop=_drop_raw, drop_=_drop_raw_)
    return (dx,) + (None,) * 8 + (dbias, dA, dB, None, None, None)


_dense_backward_once = torch.autograd.function.once_differentiable(_dense_backward)
_nf4_backward_once = torch.autograd.function.once_differentiable(_nf4_backward)


def _eager() -> bool:
    return not torch.compiler.is_compiling()


_functorch_active = torch._C._are_functorch_transforms_active


def _records(x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, weight: Tensor | None = None) -> bool:
    """Whether autograd would record a call on these tensors (else the impl runs without an autograd.Function:
    same result, no graph; functorch transforms keep the Function so they fail or work as before)."""
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or (bias is not None and bias.requires_grad)
                                    or (weight is not None and weight.requires_grad)):
        return True
    return _functorch_active()


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                dropout: float = 0.0, seed: int = 0) -> Tensor:
    """y = x @ weight.T + bias + scale * dropout(x) @ A.T @ B.T (dense base; see the module docstring)."""
    args = (x, weight, bias, A, B, float(scale), float(dropout), int(seed))
    if _eager():
        dev = _ac.device_on(x)
        if dev is None:
            return _dense_eager(*args)
        with _ac.excluded(dev):
            return _dense_eager(*_DENSE_AUTOCAST.cast(args, dev))
    return torch.ops.lorart.lora_linear(*args)[0]


def _dense_eager(x, weight, bias, A, B, scale, dropout, seed):
    _check_dense(x, weight, bias, A, B, dropout)
    if _records(x, A, B, bias, weight):
        return _DenseFn.apply(x, weight, bias, A, B, scale, dropout, seed)
    return _dense_impl(x, weight, bias, A, B, scale, dropout, seed)[0]


def lora_linear_nf4(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
                    nested_code: Tensor | None, offset: float, blocksize: int, rows: int, cols: int,
                    bias: Tensor | None, A: Tensor, B: Tensor, scale: float, dropout: float = 0.0,
                    seed: int = 0) -> Tensor:
    """The same with an NF4 base given as ``*NF4Weight.op_args()``."""
    args = (x, packed, absmax, nested_absmax, nested_code, float(offset), int(blocksize), int(rows), int(cols), bias,
            A, B, float(scale), float(dropout), int(seed))
    if _eager():
        dev = _ac.device_on(x)
        if dev is None:
            return _nf4_eager(*args)
        with _ac.excluded(dev):
            return _nf4_eager(*_NF4_AUTOCAST.cast(args, dev))
    return torch.ops.lorart.lora_linear_nf4(*args)[0]


def _nf4_eager(*args):
    x, packed, absmax, _, _, _, _, rows, cols, bias, A, B, _, dropout, _ = args
    _check_nf4_all(x, packed, absmax, rows, cols, bias, A, B, dropout)
    if _records(x, A, B, bias):
        return _NF4Fn.apply(*args)
    return _nf4_impl(*args)[0]


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ValueError(f"lorart: argument `r`: expected a positive rank, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


from .lora_extra import lora_grouped_add_, lora_merge_, lora_merge_nonfinite, lora_unmerge_  # noqa: E402

__all__ = ["lora_linear", "lora_linear_nf4", "lora_dropout", "lora_grouped_add_", "lora_merge_", "lora_unmerge_",
           "lora_merge_nonfinite", "lora_scale", "set_fused_policy", "FUSED_MAX_ROWS"]
