"""LoRA ops: torch.ops.lorart.lora_* (CPU and CUDA, fake kernels, autograd, autocast), one Op each.

    y = x @ W.T + bias + scale * dropout(x) @ A.T @ B.T      (scale = alpha / r, or alpha / sqrt(r))

- ``lora_linear_dense`` (dense W) and ``lora_linear_nf4`` (an NF4 weight, one object) return ``(y, xa)`` with
  ``xa = dropout(x) @ A.T`` (the small [M, r] product saved for backward); :func:`lora_linear` and
  :func:`lora_linear_nf4` return ``y``. ``B @ A`` is never formed; the LoRA term is added into the base output
  in place; backward saves ``x`` and ``xa`` (never a dequantised NF4 weight, never a dropout mask: it is
  recomputed from ``seed``) and gives dx, dA, dB and dbias, never dW.
- Rows <= 16 (decode) on CUDA take the fused kernel (one pass over W, dense or NF4-packed); otherwise the base
  runs on torch's GEMM (dense) or lorart.ops.nf4's path (NF4) and the LoRA term is folded into its output.
- ``lora_dropout``: the counter-based mask shared by CPU and CUDA (bit-identical, recomputable).
- ``lora_grouped_add_`` (mixed-adapter batches), ``lora_merge_`` / ``lora_unmerge_``: lorart.ops.lora_extra.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _autocast as ac
from . import nf4 as nf4ops
from ._common import _C, FLOAT_DTYPES, check_dtype, check_same_device, stream
from ._define import Op, randn

FUSED_MAX_ROWS = int(_C.lora_fused_max_rows())
_DTYPES = FLOAT_DTYPES + (torch.float64,)
_SEED_MASK = 0xFFFFFFFFFFFFFFFF

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


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- checks (shared by the real and fake kernels and the eager path) -----------------------------------------

def _check_p(p: float) -> None:
    if not (0.0 <= p < 1.0):
        raise ValueError(f"lorart: argument `dropout`: expected a probability in [0, 1), got {p}")


def _check_lora(x: Tensor, N: int, K: int, bias, A: Tensor, B: Tensor, p: float) -> None:
    """x [..., K], A [r, K], B [N, r], bias [N] | None, all of x's dtype and device; p in [0, 1). The passing
    case is a few comparisons (this runs on every call)."""
    dt = x.dtype
    if dt not in _DTYPES:
        check_dtype(x, "x", _DTYPES)
    xs = x.shape
    if not xs or xs[-1] != K:
        raise ValueError(f"lorart: argument `x`: expected [..., {K}] (in_features), got {list(xs)}")
    for name, t in (("A", A), ("B", B), ("bias", bias)):
        if t is not None and t.dtype != dt:
            raise TypeError(f"lorart: argument `{name}`: expected dtype {dt} (as `x`), got {t.dtype}")
    As = A.shape
    if len(As) != 2 or As[1] != K:
        raise ValueError(f"lorart: argument `A`: expected [r, {K}], got {list(As)}")
    if B.shape != (N, As[0]):
        raise ValueError(f"lorart: argument `B`: expected [{N}, {As[0]}] ([out_features, r]), got {list(B.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"lorart: argument `bias`: expected [{N}], got {list(bias.shape)}")
    dev = x.device
    if A.device != dev or B.device != dev or (bias is not None and bias.device != dev):
        check_same_device(("x", x), ("A", A), ("B", B), ("bias", bias))
    _check_p(p)


def _check_dense(x, weight, bias, A, B, scale, dropout, seed) -> None:
    ws = weight.shape
    if len(ws) != 2:
        raise ValueError(f"lorart: argument `weight`: expected [out_features, in_features], got {list(ws)}")
    _check_lora(x, ws[0], ws[1], bias, A, B, dropout)
    if weight.dtype != x.dtype:
        raise TypeError(f"lorart: argument `weight`: expected dtype {x.dtype} (as `x`), got {weight.dtype}")
    if weight.device != x.device:
        check_same_device(("x", x), ("weight", weight))


def _check_nf4(x, w, bias, A, B, scale, dropout, seed) -> None:
    _check_lora(x, w.rows, w.cols, bias, A, B, dropout)
    if x.dtype == torch.float64:
        raise TypeError("lorart: argument `x`: an NF4 base computes in float32|bfloat16|float16, got float64")
    nf4ops.check_weight_arg(w)
    if w.packed.device != x.device:
        check_same_device(("x", x), ("packed", w.packed))


# ---- dropout -------------------------------------------------------------------------------------------------

def _check_dropout(x: Tensor, p: float, seed: int) -> None:
    check_dtype(x, "x", _DTYPES)
    _check_p(p)


def _dropout_into(x2: Tensor, out: Tensor, p: float, seed: int) -> Tensor:
    _C.lora_dropout(x2, out, p, seed & _SEED_MASK, stream(out))
    return out


def _dropout(x: Tensor, p: float, seed: int) -> Tensor:
    x2 = _rows(x)
    return _dropout_into(x2, torch.empty_like(x2, memory_format=torch.contiguous_format), p, seed).view(x.shape)


def _dropout_setup(ctx, args, out):
    ctx.p, ctx.seed = args[1], args[2]


def _dropout_backward(ctx, grad):
    return lora_dropout.run(ctx, grad, ctx.p, ctx.seed), None, None


def _f64_ok(device, dtype) -> bool:
    return dtype != torch.float64 or torch.device(device).type == "cpu"  # the kernels: float64 on the CPU only


def _dropout_samples(device, dtype):
    if not _f64_ok(device, dtype):
        return []
    x = lambda seed, *s: randn(seed, *s, dtype=dtype, device=device)  # noqa: E731
    return [(x(1, 6, 20), 0.25, 7), (x(2, 2, 3, 16), 0.1, 2 ** 40 + 3), (x(3, 0, 8), 0.5, 1)]


lora_dropout = Op("lora_dropout", _dropout, check=_check_dropout,
                  fake=lambda x, p, seed: torch.empty_like(x, memory_format=torch.contiguous_format),
                  setup=_dropout_setup, backward=_dropout_backward, diff=("x",), samples=_dropout_samples)
"""dropout(x) with the counter-based mask of (seed, row * K + col) over x viewed as [-1, K]."""


def _drop(x2: Tensor, p: float, seed: int, inplace: bool = False) -> Tensor:
    """dropout inside an implementation (no dispatcher): a new tensor, or in place on a fresh [M, K] tensor
    (the kernels are elementwise: out may alias x)."""
    if p == 0.0:
        return x2
    return _dropout_into(x2, x2 if inplace else torch.empty_like(x2), p, seed)


# ---- the LoRA linear -----------------------------------------------------------------------------------------

_linear = torch.nn.functional.linear  # for 2-d x: addmm(bias, x, W.t()) / mm(x, W.t()), one call from Python


def _lora_tail(x2: Tensor, y: Tensor, A: Tensor, B: Tensor, scale: float, p: float, seed: int) -> Tensor:
    """The unfused LoRA path on a base output y [M, N]: y += scale * (dropout(x) @ A.T) @ B.T, in place."""
    xa = _linear(_drop(x2, p, seed), A)
    y.addmm_(xa, B.t(), alpha=scale)
    return xa


def _shrink(x2: Tensor, A: Tensor, p: float, seed: int, dtype: torch.dtype) -> Tensor:
    xa = torch.empty(x2.shape[0], A.shape[0], dtype=dtype, device=x2.device)
    _C.lora_shrink(x2, A.contiguous(), p, seed & _SEED_MASK, xa, stream(x2))
    return xa


def _dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, dropout: float,
           seed: int) -> tuple[Tensor, Tensor]:
    N = weight.shape[0]
    x2 = _rows(x)
    if _use_fused(x2, nf4=False):
        xa = _shrink(x2, A, dropout, seed, _acc_dtype(x))
        y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
        _C.lora_fused_linear(x2, weight.contiguous(), None if bias is None else bias.contiguous(), xa, B.contiguous(),
                             scale, y, stream(x))
        xa = xa.to(x.dtype)
    else:
        y = _linear(x2, weight, bias)
        xa = _lora_tail(x2, y, A, B, scale, dropout, seed)
    return _unrows(y, x, N), xa


def _nf4(x: Tensor, w: nf4ops.NF4Args, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, dropout: float,
         seed: int) -> tuple[Tensor, Tensor]:
    x2 = _rows(x)
    if _use_fused(x2, nf4=True):
        xa = _shrink(x2, A, dropout, seed, torch.float32)
        y = torch.empty(x2.shape[0], w.rows, dtype=x.dtype, device=x.device)
        _C.lora_fused_linear_nf4(x2.contiguous(), nf4ops.core(w), None if bias is None else bias.contiguous(),
                                 xa, B.contiguous(), scale, y, stream(x))
        xa = xa.to(x.dtype)
    else:  # lorart.ops.nf4's path: GEMV, or dequantised into a reused workspace (never saved for backward)
        y = nf4ops.base_linear(x2, w, bias)
        xa = _lora_tail(x2, y, A, B, scale, dropout, seed)
    return _unrows(y, x, w.rows), xa


def _fake_dense(x, weight, bias, A, B, scale, dropout, seed):
    K = weight.shape[1]
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.numel() // K if K else 0, A.shape[0])


def _fake_nf4(x, w, bias, A, B, scale, dropout, seed):
    return x.new_empty(*x.shape[:-1], w.rows), x.new_empty(x.numel() // w.cols, A.shape[0])


def _setup(ctx, args, out):
    x, base, bias, A, B, scale, dropout, seed = args
    ctx.save_for_backward(x, A, B, out[1])
    ctx.base = base  # the frozen weight (dense or NF4): never modified, no version check needed
    ctx.scale, ctx.p, ctx.seed, ctx.has_bias = float(scale), float(dropout), int(seed), bias is not None


def _drop_bw(ctx, t: Tensor, inplace: bool = False) -> Tensor:
    """The forward's dropout mask on t, in backward: the kernel directly (eager) or the op (traced)."""
    p = ctx.p
    if p == 0.0:
        return t
    return _drop(t, p, ctx.seed, inplace) if ctx.eager else lora_dropout.dispatch(t, p, ctx.seed)


def _backward(ctx, gy, gxa):
    """dx, dA, dB, dbias. The scale rides in the matmuls (alpha=s; beta=0 ignores the placeholder input, which
    only gives the shape)."""
    x, A, B, xa = ctx.saved_tensors
    s, W, needs = ctx.scale, ctx.base, ctx.needs
    need_x, need_A = needs[0], needs[3]
    gy2 = gy if gy.dim() == 2 else gy.reshape(-1, gy.shape[-1])
    dx = dA = dB = dbias = None
    if need_A or need_x:
        g_xa = torch.addmm(xa, gy2, B, beta=0, alpha=s) if gxa is None else torch.addmm(gxa, gy2, B, alpha=s)
    if needs[4]:
        dB = torch.addmm(B, gy2.t(), xa, beta=0, alpha=s)
    if need_A:
        dA = torch.mm(g_xa.t(), _drop_bw(ctx, _rows(x)))
    if need_x:
        dense = isinstance(W, Tensor)
        if ctx.p == 0.0:
            dx = torch.mm(gy2, W) if dense else nf4ops.nf4_linear_grad_input.run(ctx, gy2.contiguous(), W)
            dx.addmm_(g_xa, A)
        else:
            t = _drop_bw(ctx, torch.mm(g_xa, A), inplace=True)
            dx = torch.addmm(t, gy2, W) if dense else \
                nf4ops.nf4_linear_grad_input.run(ctx, gy2.contiguous(), W).add_(t)
        dx = dx if x.dim() == 2 else dx.view(x.shape)
    if needs[2] and ctx.has_bias:
        dbias = gy2.sum(0)
    return dx, None, dbias, dA, dB, None, None, None


# (lead dims, rows, bias, dropout): decode (fused on CUDA), prefill, 3-d input, no rows
_LORA_CASES = [((), 1, True, 0.0), ((), 5, False, 0.1), ((2,), 12, True, 0.2), ((), 0, True, 0.0)]


def _lora_samples(base, device, dtype):
    K, N, r = 64, 24, 4
    t = lambda seed, *s: randn(seed, *s, dtype=dtype, device=device, scale=s[-1] ** -0.5)  # noqa: E731
    out = []
    for i, (lead, M, bias, p) in enumerate(_LORA_CASES):
        W = t(10 + i, N, K) if base is None else base
        out.append((t(i, *lead, M, K), W, t(20 + i, N) if bias else None, t(30 + i, r, K), t(40 + i, N, r), 0.5, p,
                    11 + i))
    return out


def _dense_samples(device, dtype):
    return _lora_samples(None, device, dtype) if _f64_ok(device, dtype) else []


def _nf4_samples(device, dtype):
    return [] if dtype == torch.float64 else _lora_samples(nf4ops.sample_weight(5, 24, 64, device), device, dtype)


lora_linear_dense = Op("lora_linear", _dense, check=_check_dense, fake=_fake_dense, setup=_setup,
                       backward=_backward, diff=("x", "bias", "A", "B"), nondiff_outputs=(1,),  # never dW
                       autocast=ac.Lower("x", "weight", "bias", "A", "B"),  # as F.linear under autocast
                       samples=_dense_samples)
lora_linear_nf4_op = Op("lora_linear_nf4", _nf4, check=_check_nf4, fake=_fake_nf4, setup=_setup,
                        backward=_backward, diff=("x", "bias", "A", "B"), nondiff_outputs=(1,),
                        autocast=ac.Lower("x", "bias", "A", "B"),  # the NF4 weight decodes to x's dtype
                        samples=_nf4_samples)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                dropout: float = 0.0, seed: int = 0) -> Tensor:
    """y = x @ weight.T + bias + scale * dropout(x) @ A.T @ B.T (dense base; see the module docstring)."""
    return lora_linear_dense.first(x, weight, bias, A, B, float(scale), float(dropout), int(seed))


def lora_linear_nf4(x: Tensor, weight, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                    dropout: float = 0.0, seed: int = 0) -> Tensor:
    """The same with a frozen NF4 base `weight` (an NF4Weight, one object)."""
    return lora_linear_nf4_op.first(x, weight, bias, A, B, float(scale), float(dropout), int(seed))


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ValueError(f"lorart: argument `r`: expected a positive rank, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


from .lora_extra import lora_grouped_add_, lora_merge_, lora_merge_nonfinite, lora_unmerge_  # noqa: E402

__all__ = ["lora_linear", "lora_linear_nf4", "lora_linear_dense", "lora_linear_nf4_op", "lora_dropout",
           "lora_grouped_add_", "lora_merge_", "lora_unmerge_", "lora_merge_nonfinite", "lora_scale",
           "set_fused_policy", "FUSED_MAX_ROWS"]
