"""The CPU NF4 kernels' vector paths (whole blocks, every blocksize, every output dtype) against the
pure-PyTorch reference, bit for bit; the GEMV's permuted fused path against a float64 product; ties
in the double quant; non-finite and extreme block scales. Every kernel test runs twice: with the x86 vector
paths (where the CPU has them) and with them switched off (lorart._C.set_cpu_simd(False): the portable loops)."""
from __future__ import annotations

import pytest
import torch

from lorart import _core, nf4
from nf4_reference import _reference_dequantize, _reference_double_quant, _reference_quantize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# k % 64 == 0 (the vector GEMV) and not; blocks spanning rows; odd counts; a partial last block
SHAPES = [(3, 64), (7, 96), (16, 640), (33, 65), (2, 4096), (9, 1000), (1, 33), (64, 192)]


@pytest.fixture(autouse=True, params=["simd", "portable"])
def simd_path(request):
    """Runs the test on the vector paths and again on the portable loops (restoring the setting after)."""
    old = _core._C.set_cpu_simd(request.param == "simd")
    try:
        yield request.param
    finally:
        _core._C.set_cpu_simd(old)


def test_the_switch_picks_the_path(simd_path):
    # (the vector paths exist on any x86-64 CPU with AVX2 + FMA + F16C, which CI's runners have)
    import platform

    if simd_path == "portable":
        assert not _core._C.cpu_simd_active()
    elif platform.machine() in ("x86_64", "AMD64"):
        assert _core._C.cpu_simd_active()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # magnitudes over six decades, so that block scales differ a lot from block to block
    return (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])).to(dtype)


@pytest.mark.parametrize("bs", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_bit_exact(bs, dtype):
    for i, shape in enumerate(SHAPES):
        w = _weight(shape, dtype, i)
        q = nf4.quantize(w, bs, double_quant=False)
        rp, ra = _reference_quantize(w, bs)
        assert torch.equal(q.packed, rp) and torch.equal(q.absmax, ra), shape
        qd = nf4.quantize(w, bs, double_quant=True)
        assert torch.equal(qd.packed, rp), shape
        for w4 in (q, qd):
            for out in DTYPES:
                ref = _reference_dequantize(w4.packed, w4.absmax, w4.nested_absmax, w4.nested_code, w4.offset, bs,
                                            shape, out)
                assert torch.equal(_bits(w4.dequantize(out)), _bits(ref)), (shape, out, w4.double_quant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [32, 64, 128])
def test_gemv_every_row_count(dtype, bs):
    for i, shape in enumerate(SHAPES):
        q = nf4.quantize(_weight(shape, torch.float32, i), bs)
        ref_w = _reference_dequantize(q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, bs, shape,
                                      torch.float64)
        for m in (1, 3, 16):
            x = torch.randn(m, shape[1]).to(dtype)
            bias = torch.randn(shape[0]).to(dtype)
            y = torch.ops.lorart.nf4_linear(x, *q.op_args(), bias)
            ref = x.double() @ ref_w.T + bias.double()
            scale = ref.abs().max().item()
            # float32 accumulation, then one rounding to dtype
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert (y.double() - ref).abs().max().item() <= tol * scale, (shape, m)


def test_double_quant_ties_go_to_the_lower_code():
    code = nf4.dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    # offset 0 and a block maximum of 1.0: the scaled values are the midpoints themselves
    absmax = torch.cat([torch.ones(1), mids, mids[::3] + 1e-7, -mids[::5]]).contiguous()
    for n in (absmax.numel(), 7, 8, 9, 255):
        a = absmax[:n].contiguous()
        a[0] = 1.0
        off = torch.zeros(1)
        q, nested = torch.ops.lorart.nf4_double_quant(a, off, code)
        rq, rn, _ = _reference_double_quant(a, code, off)
        assert torch.equal(nested, rn) and torch.equal(q, rq)


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 6.0e4, 7.0e4, 1e37])
def test_extreme_scales_round_like_the_reference(scale):
    """Tables rounded to bf16/fp16 per block: subnormal, overflowing (fp16 -> inf) and huge scales."""
    w = torch.randn(4, 256) * scale
    q = nf4.quantize(w, 64)
    for out in DTYPES:
        ref = _reference_dequantize(q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, 64, (4, 256), out)
        got = q.dequantize(out)
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got[~got.isnan()], ref[~ref.isnan()])


def test_nan_block_scale_decodes_to_quiet_nan():
    """A corrupt nested scale (NaN) gives NaN for exactly the blocks it covers, in every output dtype."""
    q = nf4.quantize(torch.randn(8, 512), 64)
    q.nested_absmax[0] = float("nan")  # the first 256 blocks = 16384 elements... here all 64 blocks
    for out in DTYPES:
        got = q.dequantize(out)
        assert bool(got.isnan().all())
    q2 = nf4.quantize(torch.randn(300, 256), 64)  # 1200 blocks: nested blocks 0..4
    q2.nested_absmax[1] = float("inf")
    got = q2.dequantize(torch.bfloat16).reshape(-1)
    bad = ~torch.isfinite(got)
    assert bool(bad[256 * 64:512 * 64].any()) and not bool(bad[:256 * 64].any()) and not bool(bad[512 * 64:].any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_uses_exactly_the_dequantized_weights(dtype):
    """One-hot x rows pick single weights: the GEMV (M = 1: decode and dot fused; M = 16: a decoded row shared by
    the x rows) returns W[:, j] as nf4_dequantize stores it, exactly, for every column j of a 64-element step
    (the vector GEMV's permuted order and its bfloat16 byte tables included) and of a partial tail."""
    for shape, bs in (((5, 192), 64), ((3, 256), 128), ((4, 100), 32)):
        q = nf4.quantize(_weight(shape, torch.float32, 7), bs)
        wd = q.dequantize(dtype)
        k = shape[1]
        for j in range(k):
            x = torch.zeros(1, k, dtype=dtype)
            x[0, j] = 1
            # (values, not bits: a sum of +0 products is +0 where a weight may be -0)
            assert torch.equal(torch.ops.lorart.nf4_linear(x, *q.op_args(), None)[0], wd[:, j]), (shape, j)
        for j0 in range(0, k, 16):
            x = torch.zeros(16, k, dtype=dtype)
            cols = list(range(j0, min(k, j0 + 16)))
            x[torch.arange(len(cols)), cols] = 1
            y = torch.ops.lorart.nf4_linear(x, *q.op_args(), None)
            assert torch.equal(y[:len(cols)], wd[:, cols].T), (shape, j0)


def test_fresh_large_output_decodes_right():
    """A dequantize output above 8 MiB (the kernel advises huge pages for it) holds the reference's bits."""
    q = nf4.quantize(_weight((1024, 4160), torch.float32, 3), 64)
    ref = _reference_dequantize(q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, 64, (1024, 4160),
                                torch.bfloat16)
    out = torch.empty(2, 1024, 4160, dtype=torch.bfloat16)[1]  # an interior not aligned to 2 MiB
    _core._C.nf4_dequantize(q, out)
    assert torch.equal(_bits(out), _bits(ref))
