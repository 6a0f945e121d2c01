"""lorart.ops.lora.lora_dropout against an independent NumPy model of its counter-based mask (the hash of
cpp/include/lorart/detail/lora_math.h): every dtype, ragged row lengths (the CPU's 8-lane AVX2 path and its
scalar tail), strided rows, in place, and the scale of kept elements rounded as the scalar kernel rounds. The mask
test runs on the vector path and again with it switched off (lorart._C.set_cpu_simd(False): the portable loop)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from lorart import _core
from lorart.ops import lora as L

sys.path.insert(0, os.path.dirname(__file__))
from test_lora_exact import dropout_keep  # noqa: E402 - the NumPy model of the documented mask hash

def expected(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    M, K = x.shape
    keep = torch.from_numpy(dropout_keep(seed, p, M * K).reshape(M, K))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)  # the kernel's keep_scale: 1 / (1 - p) rounded to acc
    return torch.where(keep, x.to(acc) * scale, torch.zeros((), dtype=acc)).to(x.dtype)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K", [1, 7, 8, 9, 64, 577])
def test_mask_matches_the_hash(dtype, K, simd):
    x = (torch.randn(13, K) * 3).to(dtype)
    old = _core._C.set_cpu_simd(simd)
    try:
        for p, seed in ((0.05, 0), (0.3, 12345), (0.5, -(2**62) - 7), (0.9, 2**40 - 1)):
            got = L.lora_dropout(x, p, seed)
            assert torch.equal(got, expected(x, p, seed)), (dtype, K, p, seed)
    finally:
        _core._C.set_cpu_simd(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_rows_and_in_place(dtype):
    wide = (torch.randn(33, 100) * 2).to(dtype)
    x = wide[:, 3:70]  # rows 100 apart, unit stride along K
    assert not x.is_contiguous()
    assert torch.equal(L.lora_dropout(x, 0.2, 99), expected(x.contiguous(), 0.2, 99))
    t = x.contiguous()
    ref = expected(t, 0.2, 99)
    assert torch.equal(L._drop(t, 0.2, 99, inplace=True), ref) and torch.equal(t, ref)  # out aliases x


def test_specials_keep_their_values():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38, -2.0, 5.0, 7.0]])
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        got, ref = L.lora_dropout(x.to(dt), 0.4, 3), expected(x.to(dt), 0.4, 3)
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
