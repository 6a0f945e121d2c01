"""NF4 ops (torch.ops.lorart.nf4_*), bitsandbytes-exact layout; see docs/nf4.md.

A frozen NF4 weight is one object in every call (an ``NF4Weight``, or ``NF4Args``, anything with its eight
fields); in the schema it is the fields ``packed, absmax, nested_absmax, nested_code, offset, blocksize, rows,
cols`` (lorart.ops._define flattens it, in one place).

    nf4_quantize(w, blocksize) -> (packed, absmax)          nf4_double_quant(absmax, offset, code) -> (q, nested)
    nf4_dequantize(W, dtype) -> [rows, cols]                 nf4_linear(x, W, bias) -> x @ dequant(W).T + bias
    nf4_linear_grad_input(dy, W) -> dy @ dequant(W)
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _autocast as ac
from ._common import FLOAT_DTYPES, _C, check_dtype, check_same_device, stream
from ._define import Op, randn

NESTED_BLOCKSIZE = 256
GEMV_MAX_ROWS = {"cuda": 16, "cpu": 16}  # rows up to which nf4_linear runs the fused GEMV (else dequant + GEMM)


class NF4Args(NamedTuple):
    """An NF4 weight as the ops' schema has it (see lorart.nf4.NF4Weight for the user-facing object)."""
    packed: Tensor
    absmax: Tensor
    nested_absmax: Optional[Tensor]
    nested_code: Optional[Tensor]
    offset: float
    blocksize: int
    rows: int
    cols: int


class CheckedNF4:
    """Base of the NF4 weight objects that check themselves once when built and are frozen after
    (lorart.nf4.NF4Weight): the per-call checks skip the weight's own consistency for them, and their tensors are
    contiguous, so they reach lorart._C as they are."""
    __slots__ = ()


def check_blocksize(blocksize: int) -> None:
    if not (32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"lorart: argument `blocksize`: expected a power of two in [32, 4096], got {blocksize}")


def check_weight(w) -> None:
    """That `w` (NF4Weight / NF4Args) is a consistent NF4 weight: sizes, dtypes, one device."""
    check_blocksize(w.blocksize)
    rows, cols = w.rows, w.cols
    if rows <= 0 or cols <= 0:
        raise ValueError(f"lorart: NF4 weight: expected rows > 0 and cols > 0, got rows={rows}, cols={cols}")
    n = rows * cols
    nb = -(-n // w.blocksize)
    packed, absmax, nabs, ncode = w.packed, w.absmax, w.nested_absmax, w.nested_code
    check_dtype(packed, "packed", (torch.uint8,))
    check_dtype(absmax, "absmax", (torch.float32, torch.uint8))
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"lorart: argument `packed`: expected {(n + 1) // 2} bytes for a {rows}x{cols} weight, "
                         f"got {packed.numel()} (shape {list(packed.shape)})")
    if absmax.numel() != nb:
        raise ValueError(f"lorart: argument `absmax`: expected {nb} block scales ({n} elements / blocksize "
                         f"{w.blocksize}), got {absmax.numel()}")
    if absmax.dtype == torch.uint8:
        if nabs is None or ncode is None:
            raise ValueError("lorart: argument `absmax` is uint8 (double quantization) but "
                             "`nested_absmax`/`nested_code` are None")
        check_dtype(nabs, "nested_absmax", (torch.float32,))
        check_dtype(ncode, "nested_code", (torch.float32,))
        nn_ = -(-nb // NESTED_BLOCKSIZE)
        if nabs.numel() != nn_:
            raise ValueError(f"lorart: argument `nested_absmax`: expected {nn_} values, got {nabs.numel()}")
        if ncode.numel() != 256:
            raise ValueError(f"lorart: argument `nested_code`: expected 256 values, got {ncode.numel()}")
    elif nabs is not None or ncode is not None:
        raise ValueError("lorart: argument `absmax` is float32 (no double quantization) but "
                         "`nested_absmax`/`nested_code` were given")
    check_same_device(("packed", packed), ("absmax", absmax), ("nested_absmax", nabs), ("nested_code", ncode))


def check_weight_arg(w) -> None:
    """The per-call check of an NF4 weight argument: check_weight, but for a CheckedNF4 (checked when built)."""
    if not isinstance(w, CheckedNF4):
        check_weight(w)


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def core(w):
    """`w` as lorart._C takes it (one object; the binding reads its eight fields into the C++ NF4View): a
    CheckedNF4 as it is, any other (NF4Args) with contiguous tensors (the core refuses other layouts)."""
    if isinstance(w, CheckedNF4):
        return w
    return NF4Args(w.packed.contiguous(), w.absmax.contiguous(), _c(w.nested_absmax), _c(w.nested_code),
                   float(w.offset), int(w.blocksize), int(w.rows), int(w.cols))


# ---- quantize --------------------------------------------------------------------------------------------

def _check_quantize(w: Tensor, blocksize: int) -> None:
    check_blocksize(blocksize)
    check_dtype(w, "weight", FLOAT_DTYPES)
    if w.numel() == 0:
        raise ValueError(f"lorart: argument `weight`: expected a non-empty tensor, got shape {list(w.shape)}")


def _quantize(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    w = w.contiguous()
    n = w.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=w.device)
    _C.nf4_quantize(w, blocksize, packed, absmax, stream(w))
    if w.is_cuda and not bool(torch.isfinite(absmax).all()):  # the CPU kernel raises by itself
        b = int((~torch.isfinite(absmax)).nonzero()[0, 0])
        raise ValueError(f"lorart: argument `weight`: expected finite values, got NaN or inf in block {b} "
                         f"(elements {b * blocksize}..{min(n, (b + 1) * blocksize) - 1})")
    return packed, absmax


def _quantize_fake(w, blocksize):
    n = w.numel()
    return (w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32))


def _quantize_samples(device, dtype):
    if dtype == torch.float64:
        return []
    return [(randn(1, 40, 64, dtype=dtype, device=device), 64), (randn(2, 7, 9, dtype=dtype, device=device), 32),
            (randn(3, 130, dtype=dtype, device=device), 128)]


nf4_quantize = Op("nf4_quantize", _quantize, check=_check_quantize, fake=_quantize_fake, device="w",
                  samples=_quantize_samples)
"""Blockwise NF4 quantization of any float tensor: (packed uint8 [(n+1)//2, 1], absmax float32 [nblocks]).
Raises ValueError when `w` holds NaN or inf."""


def _check_dq(absmax: Tensor, offset: Tensor, code: Tensor) -> None:
    check_dtype(absmax, "absmax", (torch.float32,))
    check_dtype(offset, "offset", (torch.float32,))
    check_dtype(code, "code", (torch.float32,))
    if absmax.numel() == 0:
        raise ValueError("lorart: argument `absmax`: expected a non-empty tensor")
    if offset.numel() != 1:
        raise ValueError(f"lorart: argument `offset`: expected one value, got shape {list(offset.shape)}")
    if code.numel() != 256:
        raise ValueError(f"lorart: argument `code`: expected 256 values, got {code.numel()}")
    check_same_device(("absmax", absmax), ("offset", offset), ("code", code))


def _double_quant(absmax: Tensor, offset: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    absmax, offset, code = absmax.contiguous(), offset.contiguous(), code.contiguous()
    nb = absmax.numel()
    q = torch.empty((nb,), dtype=torch.uint8, device=absmax.device)
    nested = torch.empty((-(-nb // NESTED_BLOCKSIZE),), dtype=torch.float32, device=absmax.device)
    _C.nf4_double_quant(absmax, offset, code, q, nested, stream(absmax))
    return q, nested


def _double_quant_fake(absmax, offset, code):
    nb = absmax.numel()
    return absmax.new_empty((nb,), dtype=torch.uint8), absmax.new_empty((-(-nb // NESTED_BLOCKSIZE),))


def _double_quant_samples(device, dtype):
    if dtype != torch.float32:  # float32 statistics only
        return []
    code = torch.linspace(-1, 1, 256, device=device)  # any sorted 256-entry map
    out = []
    for seed, nb in ((1, 40), (2, 600)):
        absmax = randn(seed, nb, device=device).abs() + 0.1
        out.append((absmax, absmax.mean().reshape(1), code))
    return out


nf4_double_quant = Op("nf4_double_quant", _double_quant, check=_check_dq, fake=_double_quant_fake,
                      samples=_double_quant_samples)
"""Double quantization of a float32 absmax: (uint8 codes [nb], nested_absmax float32 [ceil(nb/256)]), nearest
entry of `code` (ties to the lower index) of (absmax - offset) / nested_absmax."""


# ---- dequantize ------------------------------------------------------------------------------------------

def _check_dequantize(w: NF4Args, dtype: torch.dtype) -> None:
    check_weight_arg(w)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"lorart: argument `dtype`: expected float32|bfloat16|float16, got {dtype}")


def _dequantize_into(w, out: Tensor) -> None:
    _C.nf4_dequantize(core(w), out, stream(out))


def _dequantize(w: NF4Args, dtype: torch.dtype) -> Tensor:
    out = torch.empty((w.rows, w.cols), dtype=dtype, device=w.packed.device)
    _dequantize_into(w, out)
    return out


def sample_weight(seed: int, rows: int, cols: int, device="cpu", double_quant: bool = True,
                  blocksize: int = 64) -> NF4Args:
    """A random NF4 weight (the ops' sample inputs; lorart.nf4.quantize is the user-facing way)."""
    packed, absmax = _quantize(randn(seed, rows, cols, device=device), blocksize)
    if not double_quant:
        return NF4Args(packed, absmax, None, None, 0.0, blocksize, rows, cols)
    offset = absmax.mean().reshape(1)
    code = torch.linspace(-1, 1, 256, device=device)
    q, nested = _double_quant(absmax, offset, code)
    return NF4Args(packed, q, nested, code, float(offset), blocksize, rows, cols)


def _dequantize_samples(device, dtype):
    if dtype == torch.float64:
        return []
    return [(sample_weight(1, 24, 64, device), dtype), (sample_weight(2, 5, 13, device, False, 32), dtype)]


nf4_dequantize = Op("nf4_dequantize", _dequantize, check=_check_dequantize,
                    fake=lambda w, dtype: w.packed.new_empty((w.rows, w.cols), dtype=dtype), device="w",
                    samples=_dequantize_samples)
"""The [rows, cols] weight in `dtype` (float32|bfloat16|float16), decoded in float32 and rounded once."""


# ---- linear ----------------------------------------------------------------------------------------------

_workspaces: dict = {}
_ws_lock = threading.Lock()


def _workspace(device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
    """A per-(device, stream, dtype) scratch buffer reused across calls (stream order keeps reuse safe)."""
    sid = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, sid, dtype, threading.get_ident() if device.type == "cpu" else 0)
    with _ws_lock:
        buf = _workspaces.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            _workspaces[key] = buf
    return buf[:numel]


def release_workspaces() -> None:
    """Frees the dequantization buffers kept by nf4_linear."""
    with _ws_lock:
        _workspaces.clear()


def dequantized(w, dtype: torch.dtype, device: torch.device) -> Tensor:
    """dequant(w) [rows, cols] in `dtype`, in a reused per-thread/stream workspace (valid until the next call)."""
    out = _workspace(device, dtype, w.rows * w.cols).view(w.rows, w.cols)
    _dequantize_into(w, out)
    return out


def _check_linear(x: Tensor, w: NF4Args, bias: Optional[Tensor]) -> None:
    check_weight_arg(w)
    check_dtype(x, "x", FLOAT_DTYPES)
    rows, cols = w.rows, w.cols
    if x.dim() == 0 or x.shape[-1] != cols:
        raise ValueError(f"lorart: argument `x`: expected last dimension {cols} (in_features of the {rows}x{cols} "
                         f"NF4 weight), got shape {list(x.shape)}")
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"lorart: argument `bias`: expected dtype {x.dtype} (that of `x`), got {bias.dtype}")
        if bias.shape != (rows,):
            raise ValueError(f"lorart: argument `bias`: expected shape [{rows}], got {list(bias.shape)}")
    check_same_device(("x", x), ("packed", w.packed), ("bias", bias))


def base_linear(x2: Tensor, w, bias: Optional[Tensor]) -> Tensor:
    """x2 [M, cols] @ dequant(w).T + bias -> [M, rows] in x2's dtype: the NF4 GEMV for small M (the weight
    decoded on the fly, never stored), else the weight dequantized into a reused workspace and torch's GEMM.
    Both round the decoded weight to x's dtype (bitsandbytes' rule), so the result does not depend on M but
    for the GEMM's summation order."""
    m = x2.shape[0]
    if m <= GEMV_MAX_ROWS.get(x2.device.type, 0):
        out = x2.new_empty((m, w.rows))
        if m:
            _C.nf4_gemv(x2 if x2.is_contiguous() else x2.contiguous(), core(w), _c(bias), out, stream(x2))
        return out
    return torch.nn.functional.linear(x2, dequantized(w, x2.dtype, x2.device), bias)


def _linear(x: Tensor, w: NF4Args, bias: Optional[Tensor]) -> Tensor:
    if x.dim() == 2:  # (the common case: no reshapes, which cost as much as a small GEMV's launch)
        return base_linear(x, w, bias)
    lead = x.shape[:-1]
    return base_linear(x.reshape(math.prod(lead), w.cols), w, bias).reshape(*lead, w.rows)


def _linear_setup(ctx, args, out):
    x, w, bias = args
    ctx.w = w  # frozen: never modified, no version check needed
    ctx.bias_grad = bias is not None


def _linear_backward(ctx, dy):
    w = ctx.w
    dx = db = None
    if ctx.needs[0]:
        dx = nf4_linear_grad_input.run(ctx, dy.contiguous(), w)
    if ctx.bias_grad and ctx.needs[2]:
        db = dy.reshape(-1, w.rows).sum(0)
    return dx, None, db


def _linear_samples(device, dtype):
    if dtype == torch.float64:
        return []
    w, w2 = sample_weight(1, 24, 64, device), sample_weight(2, 20, 96, device, False)
    x = lambda seed, *s: randn(seed, *s, dtype=dtype, device=device, scale=s[-1] ** -0.5)  # noqa: E731
    return [(x(3, 1, 64), w, x(4, 24)), (x(5, 20, 64), w, None), (x(6, 2, 3, 96), w2, x(7, 20)),
            (x(8, 0, 64), w, x(9, 24))]


nf4_linear = Op("nf4_linear", _linear, check=_check_linear,
                fake=lambda x, w, bias: x.new_empty((*x.shape[:-1], w.rows)),
                setup=_linear_setup, backward=_linear_backward, diff=("x", "bias"),
                autocast=ac.Lower("x", "bias"), samples=_linear_samples)
"""x @ dequant(W).T + bias for x [..., cols] -> [..., rows]; gradients to x and bias (never to W)."""


def _check_grad_input(dy: Tensor, w: NF4Args) -> None:
    check_weight_arg(w)
    check_dtype(dy, "dy", FLOAT_DTYPES)
    if dy.dim() == 0 or dy.shape[-1] != w.rows:
        raise ValueError(f"lorart: argument `dy`: expected last dimension {w.rows} (out_features), got shape "
                         f"{list(dy.shape)}")


def _grad_input(dy: Tensor, w: NF4Args) -> Tensor:
    lead = dy.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return dy.new_zeros((*lead, w.cols))
    wd = dequantized(w, dy.dtype, dy.device)
    if dy.dim() == 2:
        return torch.mm(dy, wd)
    return torch.matmul(dy.reshape(m, w.rows), wd).reshape(*lead, w.cols)


def _grad_input_samples(device, dtype):
    if dtype == torch.float64:
        return []
    w = sample_weight(1, 24, 64, device)
    return [(randn(2, 3, 24, dtype=dtype, device=device), w), (randn(3, 2, 30, 24, dtype=dtype, device=device), w),
            (randn(4, 0, 24, dtype=dtype, device=device), w)]


nf4_linear_grad_input = Op("nf4_linear_grad_input", _grad_input, check=_check_grad_input,
                           fake=lambda dy, w: dy.new_empty((*dy.shape[:-1], w.cols)), device="dy",
                           samples=_grad_input_samples)
"""dx = dy @ dequant(W) for dy [..., rows] -> [..., cols] (W re-dequantized into a reused buffer)."""


__all__ = ["NF4Args", "CheckedNF4", "nf4_quantize", "nf4_double_quant", "nf4_dequantize", "nf4_linear",
           "nf4_linear_grad_input", "check_weight", "check_weight_arg", "check_blocksize", "core", "base_linear",
           "dequantized", "sample_weight", "release_workspaces", "GEMV_MAX_ROWS", "NESTED_BLOCKSIZE"]
