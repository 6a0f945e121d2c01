"""NF4 custom ops (torch.ops.lorart.nf4_*), bitsandbytes-exact layout.

A weight is passed as the contract's tuple ``(packed, absmax, nested_absmax, nested_code,
offset, blocksize, rows, cols)`` (``NF4Weight.op_args()``); see docs/nf4.md.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import Tensor

from . import _autocast as _ac
from ._common import FLOAT_DTYPES, _C, check_device, check_dtype, check_same_device, stream

NESTED_BLOCKSIZE = 256


def _check_blocksize(blocksize: int) -> None:
    if not (32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"lorart: argument `blocksize`: expected a power of two in [32, 4096], got {blocksize}")


def _check_weight(packed, absmax, nested_absmax, nested_code, blocksize, rows, cols) -> None:
    """Validation shared by the real and fake kernels of every op taking an NF4 weight."""
    _check_blocksize(blocksize)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"lorart: NF4 weight: expected rows > 0 and cols > 0, got rows={rows}, cols={cols}")
    n = rows * cols
    nb = -(-n // blocksize)
    check_dtype(packed, "packed", (torch.uint8,))
    check_dtype(absmax, "absmax", (torch.float32, torch.uint8))
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"lorart: argument `packed`: expected {(n + 1) // 2} bytes for a {rows}x{cols} weight, "
            f"got {packed.numel()} (shape {list(packed.shape)})"
        )
    if absmax.numel() != nb:
        raise ValueError(
            f"lorart: argument `absmax`: expected {nb} block scales ({n} elements / blocksize {blocksize}), "
            f"got {absmax.numel()}"
        )
    dq = absmax.dtype == torch.uint8
    if dq:
        if nested_absmax is None or nested_code is None:
            raise ValueError(
                "lorart: argument `absmax` is uint8 (double quantization) but `nested_absmax`/`nested_code` are None"
            )
        check_dtype(nested_absmax, "nested_absmax", (torch.float32,))
        check_dtype(nested_code, "nested_code", (torch.float32,))
        nn_ = -(-nb // NESTED_BLOCKSIZE)
        if nested_absmax.numel() != nn_:
            raise ValueError(f"lorart: argument `nested_absmax`: expected {nn_} values, got {nested_absmax.numel()}")
        if nested_code.numel() != 256:
            raise ValueError(f"lorart: argument `nested_code`: expected 256 values, got {nested_code.numel()}")
    elif nested_absmax is not None or nested_code is not None:
        raise ValueError(
            "lorart: argument `absmax` is float32 (no double quantization) but `nested_absmax`/`nested_code` were given"
        )
    check_same_device(("packed", packed), ("absmax", absmax), ("nested_absmax", nested_absmax),
                      ("nested_code", nested_code))


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ---- quantize ------------------------------------------------------------------------

def _check_quantize(w: Tensor, blocksize: int) -> None:
    _check_blocksize(blocksize)
    check_dtype(w, "weight", FLOAT_DTYPES)
    if w.numel() == 0:
        raise ValueError(f"lorart: argument `weight`: expected a non-empty tensor, got shape {list(w.shape)}")


@torch.library.custom_op("lorart::nf4_quantize", mutates_args=(), schema="(Tensor w, int blocksize) -> (Tensor, Tensor)")
def nf4_quantize(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Blockwise NF4 quantization of any float tensor: (packed uint8 [(n+1)//2, 1], absmax float32 [nblocks]).
    Raises ValueError when `w` holds NaN or inf."""
    _check_quantize(w, blocksize)
    check_device(w, "weight")
    w = w.contiguous()
    n = w.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=w.device)
    _C.nf4_quantize(w, blocksize, packed, absmax, stream(w))
    if w.is_cuda and not bool(torch.isfinite(absmax).all()):  # the CPU kernel raises by itself
        b = int((~torch.isfinite(absmax)).nonzero()[0, 0])
        raise ValueError(
            f"lorart: argument `weight`: expected finite values, got NaN or inf in block {b} "
            f"(elements {b * blocksize}..{min(n, (b + 1) * blocksize) - 1})"
        )
    return packed, absmax


@nf4_quantize.register_fake
def _(w, blocksize):
    _check_quantize(w, blocksize)
    n = w.numel()
    return (w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32))


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


@torch.library.custom_op("lorart::nf4_double_quant", mutates_args=())
def nf4_double_quant(absmax: Tensor, offset: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Double quantization of a float32 absmax: (uint8 codes [nb], nested_absmax float32 [ceil(nb/256)]),
    nearest entry of `code` (ties to the lower index) of (absmax - offset) / nested_absmax."""
    _check_dq(absmax, offset, code)
    check_device(absmax, "absmax")
    absmax, offset, code = absmax.contiguous(), offset.contiguous(), code.contiguous()
    nb = absmax.numel()
    q = torch.empty((nb,), dtype=torch.uint8, device=absmax.device)
    nested = torch.empty((-(-nb // NESTED_BLOCKSIZE),), dtype=torch.float32, device=absmax.device)
    _C.nf4_double_quant(absmax, offset, code, q, nested, stream(absmax))
    return q, nested


@nf4_double_quant.register_fake
def _(absmax, offset, code):
    _check_dq(absmax, offset, code)
    nb = absmax.numel()
    return absmax.new_empty((nb,), dtype=torch.uint8), absmax.new_empty((-(-nb // NESTED_BLOCKSIZE),))


# ---- dequantize ----------------------------------------------------------------------

@torch.library.custom_op("lorart::nf4_dequantize", mutates_args=(),
                         schema="(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, int blocksize, int rows, int cols, ScalarType dtype) -> Tensor")
def nf4_dequantize(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                   offset: float, blocksize: int, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """The [rows, cols] weight in `dtype` (float32|bfloat16|float16), decoded in float32."""
    _check_weight(packed, absmax, nested_absmax, nested_code, blocksize, rows, cols)
    check_dtype(torch.empty(0, dtype=dtype), "dtype", FLOAT_DTYPES)
    check_device(packed, "packed")
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    _dequantize_into(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, out)
    return out


@nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, dtype):
    _check_weight(packed, absmax, nested_absmax, nested_code, blocksize, rows, cols)
    check_dtype(torch.empty(0, dtype=dtype), "dtype", FLOAT_DTYPES)
    return packed.new_empty((rows, cols), dtype=dtype)


def _dequantize_into(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, out: Tensor) -> None:
    _C.nf4_dequantize(packed.contiguous(), absmax.contiguous(), _c(nested_absmax),
                      _c(nested_code), float(offset), blocksize, rows, cols, out, stream(out))


# ---- linear --------------------------------------------------------------------------

# Largest row count (prod of x's leading dims) for which the fused GEMV is used; above it
# the weight is dequantized into a reused buffer and multiplied with torch.matmul.
GEMV_MAX_ROWS = {"cuda": 16, "cpu": 16}
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


def _check_linear(x, packed, absmax, nested_absmax, nested_code, blocksize, rows, cols, bias) -> None:
    _check_weight(packed, absmax, nested_absmax, nested_code, blocksize, rows, cols)
    check_dtype(x, "x", FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != cols:
        raise ValueError(
            f"lorart: argument `x`: expected last dimension {cols} (in_features of the {rows}x{cols} NF4 weight), "
            f"got shape {list(x.shape)}"
        )
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"lorart: argument `bias`: expected dtype {x.dtype} (that of `x`), got {bias.dtype}")
        if bias.shape != (rows,):
            raise ValueError(f"lorart: argument `bias`: expected shape [{rows}], got {list(bias.shape)}")
    check_same_device(("x", x), ("packed", packed), ("bias", bias))


def _linear_impl(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias) -> Tensor:
    flat = x.dim() == 2  # (the common case: no reshapes, which cost as much as a small GEMV's launch)
    lead = x.shape[:-1]
    m = x.shape[0] if flat else math.prod(lead)
    x2 = x if flat and x.is_contiguous() else x.reshape(m, cols).contiguous()
    if m == 0:
        return x.new_zeros((*lead, rows))
    if m <= GEMV_MAX_ROWS.get(x.device.type, 0):
        out = x2.new_empty((m, rows))
        _C.nf4_gemv(x2, packed.contiguous(), absmax.contiguous(), _c(nested_absmax),
                    _c(nested_code), float(offset), blocksize, rows, cols, _c(bias), out, stream(x))
        return out if flat else out.reshape(*lead, rows)
    w = _workspace(x.device, x.dtype, rows * cols).view(rows, cols)
    _dequantize_into(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, w)
    out = torch.nn.functional.linear(x2, w, bias)
    return out if flat else out.reshape(*lead, rows)


@torch.library.custom_op("lorart::nf4_linear", mutates_args=(),
                         schema="(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, int blocksize, int rows, int cols, Tensor? bias) -> Tensor")
def nf4_linear(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
               nested_code: Optional[Tensor], offset: float, blocksize: int, rows: int, cols: int,
               bias: Optional[Tensor]) -> Tensor:
    """x @ dequant(W).T + bias for x [..., cols] -> [..., rows] (W frozen; no full-precision W kept)."""
    _check_linear(x, packed, absmax, nested_absmax, nested_code, blocksize, rows, cols, bias)
    check_device(x, "x")
    return _linear_impl(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias)


@nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias):
    _check_linear(x, packed, absmax, nested_absmax, nested_code, blocksize, rows, cols, bias)
    return x.new_empty((*x.shape[:-1], rows))


@torch.library.custom_op("lorart::nf4_linear_grad_input", mutates_args=(),
                         schema="(Tensor dy, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, int blocksize, int rows, int cols) -> Tensor")
def nf4_linear_grad_input(dy: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                          nested_code: Optional[Tensor], offset: float, blocksize: int, rows: int,
                          cols: int) -> Tensor:
    """dx = dy @ dequant(W) for dy [..., rows] -> [..., cols] (re-dequantizes into a reused buffer)."""
    _check_weight(packed, absmax, nested_absmax, nested_code, blocksize, rows, cols)
    check_dtype(dy, "dy", FLOAT_DTYPES)
    check_device(dy, "dy")
    return _grad_input_impl(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols)


def _grad_input_impl(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols) -> Tensor:
    lead = dy.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return dy.new_zeros((*lead, cols))
    w = _workspace(dy.device, dy.dtype, rows * cols).view(rows, cols)
    _dequantize_into(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, w)
    if dy.dim() == 2:
        return torch.mm(dy, w)
    return torch.matmul(dy.reshape(m, rows), w).reshape(*lead, cols)


@nf4_linear_grad_input.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols):
    _check_weight(packed, absmax, nested_absmax, nested_code, blocksize, rows, cols)
    return dy.new_empty((*dy.shape[:-1], cols))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code)
    ctx.meta = (offset, blocksize, rows, cols)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[9]


def _backward(ctx, dy):
    packed, absmax, nested_absmax, nested_code = ctx.saved_tensors
    offset, blocksize, rows, cols = ctx.meta
    dx = None
    if ctx.needs_input_grad[0]:
        dx = nf4_linear_grad_input(dy.contiguous(), packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                   rows, cols)
    db = dy.reshape(-1, rows).sum(0) if ctx.bias_grad else None
    return dx, None, None, None, None, None, None, None, None, db


nf4_linear.register_autograd(_backward, setup_context=_setup_context)
_LINEAR_AUTOCAST = _ac.Lower(0, 9)  # x, bias: as F.linear under autocast (the weight decodes to x's dtype)
_ac.register("nf4_linear", _LINEAR_AUTOCAST)
for _name in ("nf4_quantize", "nf4_double_quant", "nf4_dequantize", "nf4_linear_grad_input"):
    _ac.register(_name, _ac.Keep())


# ---- eager fast path ----------------------------------------------------------------------------------------
# The custom op's dispatch (autograd wrapper, dynamo guard, redispatch) costs tens of microseconds per call,
# which is the whole budget of a decode-size GEMV. Outside torch.compile, nf4_linear_eager runs the same
# checks and the same implementations through a plain autograd.Function; under torch.compile it is the op.
class _NF4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols):
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code)
        ctx.meta = (offset, blocksize, rows, cols)
        return _linear_impl(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, nested_absmax, nested_code = ctx.saved_tensors
        offset, blocksize, rows, cols = ctx.meta
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _grad_input_impl(dy.contiguous(), packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                  rows, cols)
        if ctx.needs_input_grad[1]:
            db = dy.reshape(-1, rows).sum(0)
        return dx, db, None, None, None, None, None, None, None, None


def nf4_linear_eager(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], offset: float, blocksize: int, rows: int, cols: int,
                     bias: Optional[Tensor]) -> Tensor:
    """Same result and gradients as torch.ops.lorart.nf4_linear, without the dispatcher in eager mode."""
    if torch.compiler.is_compiling():
        return torch.ops.lorart.nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows,
                                           cols, bias)
    dev = _ac.device_on(x)
    if dev is not None:
        args = (x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias)
        with _ac.excluded(dev):
            return nf4_linear_eager(*_LINEAR_AUTOCAST.cast(args, dev))
    _check_linear(x, packed, absmax, nested_absmax, nested_code, blocksize, rows, cols, bias)
    check_device(x, "x")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _NF4LinearFn.apply(x, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows,
                                  cols)
    return _linear_impl(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, bias)

__all__ = ["nf4_quantize", "nf4_double_quant", "nf4_dequantize", "nf4_linear", "nf4_linear_grad_input",
           "nf4_linear_eager",
           "release_workspaces", "GEMV_MAX_ROWS"]
