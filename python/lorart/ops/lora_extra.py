"""LoRA ops without autograd: mixed-adapter batches and merge/unmerge (see lorart.ops.lora)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _autocast as _ac
from ._common import _C, FLOAT_DTYPES, check_device, check_dtype, check_same_device, stream

_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check_grouped(y, x, A_stack, B_stack, ranks, scales, adapter_idx):
    check_dtype(x, "x", _DTYPES)
    if x.dim() != 2:
        raise ValueError(f"lorart: argument `x`: expected [M, in_features], got {list(x.shape)}")
    if A_stack.dim() != 3 or A_stack.shape[2] != x.shape[1]:
        raise ValueError(f"lorart: argument `A_stack`: expected [L, r_max, {x.shape[1]}], got {list(A_stack.shape)}")
    L, rmax = A_stack.shape[0], A_stack.shape[1]
    if B_stack.dim() != 3 or B_stack.shape[0] != L or B_stack.shape[2] != rmax:
        raise ValueError(f"lorart: argument `B_stack`: expected [{L}, out_features, {rmax}], got {list(B_stack.shape)}")
    if y.dim() != 2 or y.shape != (x.shape[0], B_stack.shape[1]):
        raise ValueError(f"lorart: argument `y`: expected [{x.shape[0]}, {B_stack.shape[1]}], got {list(y.shape)}")
    for name, t in (("y", y), ("A_stack", A_stack), ("B_stack", B_stack)):
        if t.dtype != x.dtype:
            raise TypeError(f"lorart: argument `{name}`: expected dtype {x.dtype} (as `x`), got {t.dtype}")
    check_dtype(ranks, "ranks", (torch.int32,))
    check_dtype(scales, "scales", (torch.float32,))
    check_dtype(adapter_idx, "adapter_idx", (torch.int32, torch.int64))
    if ranks.shape != (L,) or scales.shape != (L,):
        raise ValueError(f"lorart: arguments `ranks`/`scales`: expected [{L}], got {list(ranks.shape)} and "
                         f"{list(scales.shape)}")
    if adapter_idx.shape != (x.shape[0],):
        raise ValueError(f"lorart: argument `adapter_idx`: expected [{x.shape[0]}] (one per row), got "
                         f"{list(adapter_idx.shape)}")
    check_same_device(("y", y), ("x", x), ("A_stack", A_stack), ("B_stack", B_stack), ("ranks", ranks),
                      ("scales", scales), ("adapter_idx", adapter_idx))


@torch.library.custom_op("lorart::lora_grouped_add_", mutates_args=("y",))
def lora_grouped_add_(y: Tensor, x: Tensor, A_stack: Tensor, B_stack: Tensor, ranks: Tensor, scales: Tensor,
                      adapter_idx: Tensor) -> None:
    """y[m] += scales[i] * B_stack[i, :, :ranks[i]] @ A_stack[i, :ranks[i]] @ x[m] with i = adapter_idx[m]
    (-1: no adapter), all rows in one launch (Punica BGMV). Inference only (no autograd). Adapters of lower
    rank are zero-padded to r_max; ``ranks`` lets the kernels skip the padding. Out-of-range indices raise on
    the CPU; on CUDA they mean "no adapter" (validating them there would synchronise)."""
    _check_grouped(y, x, A_stack, B_stack, ranks, scales, adapter_idx)
    _grouped_impl(y, x, A_stack, B_stack, ranks, scales, adapter_idx)


def lora_grouped_add(y: Tensor, x: Tensor, A_stack: Tensor, B_stack: Tensor, ranks: Tensor, scales: Tensor,
                     adapter_idx: Tensor) -> None:
    """lora_grouped_add_ without the dispatcher in eager mode (the op under torch.compile)."""
    if torch.compiler.is_compiling():
        return torch.ops.lorart.lora_grouped_add_(y, x, A_stack, B_stack, ranks, scales, adapter_idx)
    dev = _ac.device_on(x)
    if dev is not None:
        y, x, A_stack, B_stack, ranks, scales, adapter_idx = _GROUPED_AUTOCAST.cast(
            (y, x, A_stack, B_stack, ranks, scales, adapter_idx), dev)
    _check_grouped(y, x, A_stack, B_stack, ranks, scales, adapter_idx)
    _grouped_impl(y, x, A_stack, B_stack, ranks, scales, adapter_idx)


def _grouped_impl(y, x, A_stack, B_stack, ranks, scales, adapter_idx):
    check_device(x, "x")
    if y.stride(-1) != 1 and y.numel():
        raise ValueError("lorart: argument `y`: expected unit stride along the last dimension")
    x = x if x.stride(-1) == 1 else x.contiguous()
    ws = torch.empty(x.shape[0], A_stack.shape[1], device=x.device,
                     dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    _C.lora_grouped_add(y, x, A_stack.contiguous(), B_stack.contiguous(),
                        ranks.contiguous(), scales.contiguous(), adapter_idx, ws, stream(x))


@lora_grouped_add_.register_fake
def _(y, x, A_stack, B_stack, ranks, scales, adapter_idx):
    _check_grouped(y, x, A_stack, B_stack, ranks, scales, adapter_idx)


def _check_merge(W, A, B):
    check_dtype(W, "W", _DTYPES)
    if W.dim() != 2:
        raise ValueError(f"lorart: argument `W`: expected [out_features, in_features], got {list(W.shape)}")
    if A.dim() != 2 or A.shape[1] != W.shape[1]:
        raise ValueError(f"lorart: argument `A`: expected [r, {W.shape[1]}], got {list(A.shape)}")
    if B.dim() != 2 or B.shape != (W.shape[0], A.shape[0]):
        raise ValueError(f"lorart: argument `B`: expected [{W.shape[0]}, {A.shape[0]}], got {list(B.shape)}")
    for name, t in (("A", A), ("B", B)):
        if t.dtype != W.dtype:
            raise TypeError(f"lorart: argument `{name}`: expected dtype {W.dtype} (as `W`), got {t.dtype}")
    check_same_device(("W", W), ("A", A), ("B", B))
    if not W.is_contiguous():
        raise ValueError("lorart: argument `W`: expected a contiguous weight")


@torch.library.custom_op("lorart::lora_merge_", mutates_args=("W",))
def lora_merge_(W: Tensor, A: Tensor, B: Tensor, scale: float) -> None:
    """W += scale * B @ A in place, each element computed in float32 and rounded once (B @ A is never formed)."""
    _check_merge(W, A, B)
    check_device(W, "W")
    _C.lora_merge(W, A.contiguous(), B.contiguous(), scale, stream(W))


@lora_merge_.register_fake
def _(W, A, B, scale):
    _check_merge(W, A, B)


@torch.library.custom_op("lorart::lora_unmerge_", mutates_args=("W",))
def lora_unmerge_(W: Tensor, A: Tensor, B: Tensor, scale: float) -> None:
    """W -= scale * B @ A in place. Not bit-exact in low precision (rounding): LoRALinear.unmerge restores the
    saved original instead (docs/lora.md)."""
    _check_merge(W, A, B)
    check_device(W, "W")
    _C.lora_merge(W, A.contiguous(), B.contiguous(), -scale, stream(W))


@lora_unmerge_.register_fake
def _(W, A, B, scale):
    _check_merge(W, A, B)


@torch.library.custom_op("lorart::lora_merge_nonfinite", mutates_args=())
def lora_merge_nonfinite(W: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Number (int32 [1]) of elements of W + scale * B @ A that would be NaN or inf in W's dtype; W is not
    written (the safe-merge check)."""
    _check_merge(W, A, B)
    check_device(W, "W")
    count = torch.zeros(1, dtype=torch.int32, device=W.device)
    _C.lora_merge_count_nonfinite(W, A.contiguous(), B.contiguous(), scale, count, stream(W))
    return count


@lora_merge_nonfinite.register_fake
def _(W, A, B, scale):
    _check_merge(W, A, B)
    return W.new_empty(1, dtype=torch.int32)


# autocast: the in-place ops compute in the dtype of what they write (y, W); nothing else changes
_GROUPED_AUTOCAST = _ac.Like(0, 1, 2, 3)
_ac.register("lora_grouped_add_", _GROUPED_AUTOCAST)
for _name in ("lora_merge_", "lora_unmerge_", "lora_merge_nonfinite"):
    _ac.register(_name, _ac.Like(0, 1, 2))
