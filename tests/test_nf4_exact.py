"""NF4 where a small bug hides: values exactly on a midpoint between two codes, the reciprocal bitsandbytes
multiplies by, double-quant scales of weights with more than 256 blocks, NF4Linear's compute dtype.

References are written here from the format (/work/shared/notes/nf4-format.md) in numpy float32, not taken
from lorart; bitsandbytes' own CPU quantizer is a second reference where it is installed. (bench/mutants.py
runs these against mutated kernels.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lorart
from lorart.nn import NF4Linear

from nf4_reference import CODE, _reference_dequantize

CODE32 = CODE.numpy().astype(np.float32)
MIDS32 = ((CODE32[:-1] + CODE32[1:]) / np.float32(2)).astype(np.float32)   # float32, as bitsandbytes


def codes_of(w: lorart.nf4.NF4Weight, n: int) -> np.ndarray:
    p = w.packed.cpu().reshape(-1).numpy()
    return np.stack([p >> 4, p & 15], 1).reshape(-1)[:n]


def expected_code(scaled: np.float32) -> int:
    """Nearest code, ties to the lower one: the number of midpoints strictly below the scaled value."""
    return int(np.sum(MIDS32 < np.float32(scaled)))


@pytest.mark.parametrize("absmax", [1.0, 2.0, 0.5, 2.0 ** -7, 64.0])
def test_values_exactly_on_a_midpoint_go_to_the_lower_code(device, absmax):
    # absmax a power of two: x = mid * absmax is exact, and so is x * (1 / absmax) = mid
    a = np.float32(absmax)
    block = np.zeros(64, np.float32)
    block[0] = a                                # sets the block's absmax
    block[1:16] = MIDS32 * a                    # the 15 midpoints, each exactly
    block[16] = -a
    block[17:32] = -MIDS32 * a                  # mirrored (the table is not symmetric: other ties)
    assert np.array_equal(block[1:16] / a, MIDS32)
    w = torch.from_numpy(np.tile(block, 3)).reshape(3, 64).to(device)
    q = lorart.nf4.quantize(w, blocksize=64, double_quant=False)
    got = codes_of(q, w.numel())[:64]
    want = [expected_code(v / a) for v in block]
    assert want[1:16] == list(range(15))        # every midpoint to its lower code
    assert got.tolist() == want
    assert torch.equal(q.absmax.cpu(), torch.full((3,), absmax))


def test_midpoints_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    for a in (1.0, 0.25):
        x = np.zeros(64, np.float32)
        x[0], x[1:16], x[17:32] = a, MIDS32 * a, -MIDS32 * a
        t = torch.from_numpy(x).reshape(1, 64)
        packed, _ = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
        ours = lorart.nf4.quantize(t, blocksize=64, double_quant=False)
        assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))


def ulps_from(x: np.float32, k: int) -> np.float32:
    toward = np.float32(np.inf if k > 0 else -np.inf)
    for _ in range(abs(k)):
        x = np.nextafter(x, toward)
    return np.float32(x)


def reciprocal_cases(count: int = 12, seed: int = 0):
    """(absmax, x) pairs, absmax not a power of two, where x * (1/absmax) (bitsandbytes: the reciprocal in
    float32, then the product) and x / absmax fall on different sides of a midpoint."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        a = np.float32(rng.uniform(0.01, 3.0))
        inv = np.float32(1) / a
        for m in MIDS32:
            for k in range(-3, 4):
                x = ulps_from(np.float32(m * a), k)
                if expected_code(np.float32(x * inv)) != expected_code(np.float32(x / a)):
                    cases.append((a, x))
    return cases[:count]


def test_quantize_scales_by_the_float32_reciprocal(device):
    cases = reciprocal_cases()
    w = np.zeros((len(cases), 64), np.float32)
    for i, (a, x) in enumerate(cases):
        w[i, 0], w[i, 1] = a, x
    q = lorart.nf4.quantize(torch.from_numpy(w).to(device), blocksize=64, double_quant=False)
    got = codes_of(q, w.size).reshape(len(cases), 64)[:, 1]
    want = [expected_code(np.float32(x * (np.float32(1) / a))) for a, x in cases]
    assert got.tolist() == want


def test_reciprocal_cases_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    cases = reciprocal_cases()
    w = np.zeros((len(cases), 64), np.float32)
    for i, (a, x) in enumerate(cases):
        w[i, 0], w[i, 1] = a, x
    t = torch.from_numpy(w)
    packed, _ = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
    ours = lorart.nf4.quantize(t, blocksize=64, double_quant=False)
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))


def test_double_quant_scales_of_many_blocks(device):
    # 600 blocks of 64: three nested groups of 256 blocks with very different scales, so that a block reading
    # another group's nested absmax (or a scale without the offset) decodes differently from the format
    torch.manual_seed(0)
    g = torch.randn(600, 64)
    g[:256] *= 0.01
    g[256:512] *= 5.0
    w = g.reshape(-1, 128).to(device)
    q = lorart.nf4.quantize(w, blocksize=64, double_quant=True)
    assert q.nested_absmax.numel() == 3
    ref = _reference_dequantize(q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, 64, tuple(w.shape),
                                torch.float32)
    assert torch.equal(q.dequantize(torch.float32).cpu(), ref)
    # and the three groups' nested scales really differ (else a block reading its neighbour's would pass)
    assert len(set(q.nested_absmax.cpu().tolist())) == 3


# ---- NF4Linear's compute dtype -------------------------------------------------------------------------------

@pytest.mark.parametrize("cdt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_nf4_linear_runs_in_its_compute_dtype(device, cdt, rows):
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 40)
    layer = NF4Linear.from_linear(lin, compute_dtype=cdt).to(device)
    # inputs that the compute dtype cannot hold: a run in float32 gives values the compute dtype cannot hold
    x = (torch.randn(rows, 96) * (1 + 2.0 ** -12)).to(device)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, y.to(cdt).float()), "the result was not computed (rounded) in the compute dtype"
    w = layer.weight
    W = _reference_dequantize(w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize,
                              tuple(w.shape), torch.float32)
    # the reference: weights decoded in float32 and rounded to the compute dtype (bitsandbytes' dequantize),
    # x rounded to it, products accumulated in float64, the result rounded to the compute dtype once
    ref = (x.cpu().to(cdt).double() @ W.to(cdt).double().T + lin.bias.detach().to(cdt).double()).to(cdt).float()
    # within the rounding error of a product in the compute dtype: |y - ref| <= 2 eps (|ref| + |x| @ |W|^T)
    eps = torch.finfo(cdt).eps
    bound = 2 * eps * (ref.abs() + x.cpu().abs() @ W.abs().T + lin.bias.detach().abs())
    err = (y.cpu() - ref).abs()
    assert bool((err <= bound).all()), f"max error {float((err - bound).max()):.3g} over the bound"
