"""LoRA ops without autograd: mixed-adapter batches and merge/unmerge (see lorart.ops.lora). Under autocast they
compute in the dtype of what they write (y, W)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _autocast as ac
from ._common import _C, FLOAT_DTYPES, check_dtype, check_same_device, stream
from ._define import Op, randn

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
    if y.stride(-1) != 1 and y.numel():
        raise ValueError("lorart: argument `y`: expected unit stride along the last dimension")


def _grouped(y: Tensor, x: Tensor, A_stack: Tensor, B_stack: Tensor, ranks: Tensor, scales: Tensor,
             adapter_idx: Tensor) -> None:
    x = x if x.stride(-1) == 1 else x.contiguous()
    ws = torch.empty(x.shape[0], A_stack.shape[1], device=x.device,
                     dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    _C.lora_grouped_add(y, x, A_stack.contiguous(), B_stack.contiguous(), ranks.contiguous(), scales.contiguous(),
                        adapter_idx, ws, stream(x))


def _f64_ok(device, dtype) -> bool:
    return dtype != torch.float64 or torch.device(device).type == "cpu"  # the kernels: float64 on the CPU only


def _grouped_samples(device, dtype):
    if not _f64_ok(device, dtype):
        return []
    t = lambda seed, *s: randn(seed, *s, dtype=dtype, device=device, scale=s[-1] ** -0.5)  # noqa: E731
    out = []
    for seed, M, idx in ((0, 6, [0, 2, -1, 1, 1, 0]), (1, 1, [1]), (2, 0, [])):
        K, N, L, R = 20, 12, 3, 4
        out.append((t(seed, M, N), t(seed + 1, M, K), t(seed + 2, L, R, K), t(seed + 3, L, N, R),
                    torch.tensor([4, 2, 3], dtype=torch.int32, device=device),
                    torch.tensor([0.5, 1.0, 2.0], device=device), torch.tensor(idx, dtype=torch.int64, device=device)))
    return out


lora_grouped_add_ = Op("lora_grouped_add_", _grouped, check=_check_grouped, fake=lambda *a: None, mutates=("y",),
                       autocast=ac.Like("y", "x", "A_stack", "B_stack"), device="x", samples=_grouped_samples)
"""y[m] += scales[i] * B_stack[i, :, :ranks[i]] @ A_stack[i, :ranks[i]] @ x[m] with i = adapter_idx[m] (-1: no
adapter), all rows in one launch (Punica BGMV). Inference only (no autograd). Adapters of lower rank are
zero-padded to r_max; ``ranks`` lets the kernels skip the padding. Out-of-range indices raise on the CPU; on CUDA
they mean "no adapter" (validating them there would synchronise)."""


def _check_merge(W, A, B, scale):
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


def _merge(W: Tensor, A: Tensor, B: Tensor, scale: float) -> None:
    _C.lora_merge(W, A.contiguous(), B.contiguous(), scale, stream(W))


def _unmerge(W: Tensor, A: Tensor, B: Tensor, scale: float) -> None:
    _C.lora_merge(W, A.contiguous(), B.contiguous(), -scale, stream(W))


def _nonfinite(W: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    count = torch.zeros(1, dtype=torch.int32, device=W.device)
    _C.lora_merge_count_nonfinite(W, A.contiguous(), B.contiguous(), scale, count, stream(W))
    return count


def _merge_samples(device, dtype):
    if not _f64_ok(device, dtype):
        return []
    t = lambda seed, *s: randn(seed, *s, dtype=dtype, device=device, scale=s[-1] ** -0.5)  # noqa: E731
    return [(t(0, 20, 36), t(1, 4, 36), t(2, 20, 4), 0.7), (t(3, 1, 5), t(4, 2, 5), t(5, 1, 2), -2.0),
            (t(6, 0, 8), t(7, 3, 8), t(8, 0, 3), 1.0)]


_MERGE_AUTOCAST = ac.Like("W", "A", "B")
lora_merge_ = Op("lora_merge_", _merge, check=_check_merge, fake=lambda *a: None, mutates=("W",),
                 autocast=_MERGE_AUTOCAST, samples=_merge_samples)
"""W += scale * B @ A in place, each element computed in float32 and rounded once (B @ A is never formed)."""
lora_unmerge_ = Op("lora_unmerge_", _unmerge, check=_check_merge, fake=lambda *a: None, mutates=("W",),
                   autocast=_MERGE_AUTOCAST, samples=_merge_samples)
"""W -= scale * B @ A in place. Not bit-exact in low precision (rounding): LoRALinear.unmerge restores the saved
original instead (docs/lora.md)."""
lora_merge_nonfinite = Op("lora_merge_nonfinite", _nonfinite, check=_check_merge,
                          fake=lambda W, A, B, scale: W.new_empty(1, dtype=torch.int32), autocast=_MERGE_AUTOCAST,
                          samples=_merge_samples)
"""Number (int32 [1]) of elements of W + scale * B @ A that would be NaN or inf in W's dtype; W is not written
(the safe-merge check)."""

__all__ = ["lora_grouped_add_", "lora_merge_", "lora_unmerge_", "lora_merge_nonfinite"]
