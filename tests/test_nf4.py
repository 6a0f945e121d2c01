"""NF4 ops against the pure-PyTorch reference (tests/nf4_reference.py), opcheck, gradients, bad input."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lorart
from lorart import nf4
from lorart.ops import nf4 as nf4_ops
from nf4_reference import (CODE, _reference_dequantize, _reference_double_quant, _reference_dynamic_map,
                           _reference_quantize, reference_dequantize_weight)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sample_inputs(device):
    """(weight shape, blocksize, dtype, double_quant, x shape, bias) cases shared by correctness,
    gradient and opcheck tests: partial last block, odd counts, blocks spanning rows, GEMV and matmul paths."""
    return [
        ((32, 96), 64, torch.float32, True, (3, 96), True),        # blocks span rows (96 % 64 != 0)
        ((7, 13), 32, torch.bfloat16, False, (2, 5, 13), False),   # odd count, partial last block
        ((48, 64), 128, torch.float16, True, (20, 64), True),      # M = 20: dequantize + matmul path
        ((300, 256), 64, torch.float32, True, (1, 256), False),    # > 256 blocks: 2 nested blocks
        ((16, 40), 256, torch.bfloat16, True, (4, 40), True),
    ]


def _w(shape, dtype, device):
    return (torch.randn(shape) * 0.05).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bs", [((64,), 64), ((33, 65), 64), ((5, 7, 11), 32), ((129, 100), 128), ((1,), 4096)])
def test_quantize_matches_reference(device, dtype, shape, bs):
    w = _w(shape, dtype, device)
    q = nf4.quantize(w, bs, double_quant=False)
    rp, ra = _reference_quantize(w, bs)
    assert torch.equal(q.packed.cpu(), rp)
    assert torch.equal(q.absmax.cpu(), ra)
    assert q.shape == w.shape and q.dtype == dtype and q.blocksize == bs
    # dequantize: fp32 decode then one rounding to the requested dtype
    for out_dt in (None, torch.float32):
        got = q.dequantize(out_dt)
        ref = _reference_dequantize(rp, ra, None, None, 0.0, bs, shape, out_dt or dtype)
        assert got.dtype == (out_dt or dtype) and got.shape == w.shape
        assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_count_pads_with_code_7_whatever_the_scale(device, dtype):
    """The pad nibble of an odd count is code 7 (0.0) even when the last block's absmax is subnormal, so that its
    reciprocal is inf (0 * inf would be NaN, code 0; found by cpp/tests/test_nf4_quantize.cpp under ASan)."""
    for n, bs in ((3, 64), (64 + 33, 32), (129, 128)):
        w = torch.randn(n) * 0.05
        w[(n - 1) // bs * bs:] = torch.tensor([1e-40, -2e-40, 3e-40]).repeat(bs)[: n - (n - 1) // bs * bs]
        w = w.to(dtype).to(device)
        q = nf4.quantize(w, bs, double_quant=False)
        rp, ra = _reference_quantize(w, bs)
        assert int(q.packed.reshape(-1)[-1].item()) & 15 == 7
        assert torch.equal(q.packed.cpu(), rp) and torch.equal(q.absmax.cpu(), ra)


@pytest.mark.parametrize("nb", [1, 7, 256, 600])
def test_double_quant_matches_reference(device, nb):
    absmax = (torch.rand(nb) * 0.2 + 0.01).to(device)
    code = nf4.dynamic_map(device)
    offset = absmax.mean().reshape(1)
    q, nested = torch.ops.lorart.nf4_double_quant(absmax, offset, code)
    rq, rn, ro = _reference_double_quant(absmax.cpu(), code.cpu(), offset.cpu())
    assert torch.equal(nested.cpu(), rn)
    assert torch.equal(q.cpu(), rq)


def test_dynamic_map_from_definition():
    m = nf4.dynamic_map()
    assert m.shape == (256,) and torch.equal(m, _reference_dynamic_map())
    assert bool((m[1:] > m[:-1]).all()) and m[-1] == 1.0 and (m == 0).sum() == 1


@pytest.mark.parametrize("case", range(5))
def test_dequantize_double_quant_and_linear(device, case):
    shape, bs, dtype, dq, xshape, has_bias = sample_inputs(device)[case]
    w = _w(shape, dtype, device)
    q = nf4.quantize(w, bs, double_quant=dq)
    ref = reference_dequantize_weight(q)
    got = q.dequantize(torch.float32)
    assert torch.equal(got.cpu(), ref)
    # quantization error is bounded by half the widest code gap times the block scale
    assert (got.cpu() - w.float().cpu()).abs().max() <= 0.17 * w.float().abs().max() + 1e-6
    x = torch.randn(xshape, dtype=dtype, device=device)
    bias = torch.randn(shape[0], dtype=dtype, device=device) if has_bias else None
    y = nf4_ops.nf4_linear(x, q, bias)
    ref_y = x.float().cpu() @ ref.T + (bias.float().cpu() if has_bias else 0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert y.shape == (*xshape[:-1], shape[0]) and y.dtype == dtype
    torch.testing.assert_close(y.float().cpu(), ref_y, atol=tol * ref_y.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("case", range(5))
def test_linear_gradients(device, case):
    shape, bs, dtype, dq, xshape, has_bias = sample_inputs(device)[case]
    q = nf4.quantize(_w(shape, torch.float32, device), bs, double_quant=dq)
    x = torch.randn(xshape, device=device, requires_grad=True)
    bias = torch.randn(shape[0], device=device, requires_grad=True) if has_bias else None
    y = nf4_ops.nf4_linear(x, q, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    wref = reference_dequantize_weight(q).to(device)
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_() if has_bias else None
    y2 = x2 @ wref.T + (b2 if has_bias else 0)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    if has_bias:
        torch.testing.assert_close(bias.grad, b2.grad, atol=1e-4, rtol=1e-4)


def test_gemv_and_matmul_paths_agree(device, monkeypatch):
    q = nf4.quantize(_w((64, 128), torch.float32, device), 64)
    x = torch.randn(4, 128, device=device)
    y_gemv = nf4_ops.nf4_linear(x, q, None)
    monkeypatch.setitem(nf4_ops.GEMV_MAX_ROWS, device, 0)
    y_mm = nf4_ops.nf4_linear(x, q, None)
    torch.testing.assert_close(y_gemv, y_mm, atol=1e-5, rtol=1e-5)


def test_sizes_and_bits():
    q = nf4.quantize(torch.randn(256, 256), 64)
    assert abs(q.bits_per_param - 4.127) < 1e-3
    assert q.nbytes == 256 * 256 // 2 + 1024 + 4 * 4
    q = nf4.quantize(torch.randn(256, 256), 64, double_quant=False)
    assert q.bits_per_param == 4.5 and q.nested_absmax is None and q.offset == 0.0


def test_zero_block_and_odd_padding():
    w = torch.zeros(65)
    w[64] = 0.5
    q = nf4.quantize(w, 64, double_quant=False)
    assert q.absmax.tolist() == [0.0, 0.5]
    assert torch.all(q.packed[:32] == 0x77) and q.packed[32, 0] == (15 << 4 | 7)
    assert torch.equal(q.dequantize(), w)


# ---- bad input --------------------------------------------------------------------------

def test_bad_dtype_and_blocksize():
    with pytest.raises(TypeError, match="weight.*float32"):
        nf4.quantize(torch.ones(64, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight"):
        nf4.quantize(torch.ones(64, dtype=torch.int32))
    for bs in (16, 48, 8192):
        with pytest.raises(ValueError, match="blocksize.*power of two"):
            nf4.quantize(torch.ones(64), bs)
    with pytest.raises(ValueError, match="non-empty"):
        nf4.quantize(torch.ones(0, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises(device, bad):
    w = torch.randn(200, device=device)
    w[150] = bad
    with pytest.raises(ValueError, match=r"weight.*NaN or inf in block 2 \(elements 128..191\)"):
        nf4.quantize(w, 64)


@pytest.mark.parametrize("path", ["eager", "dispatcher"])
def test_linear_shape_and_dtype_errors(path):
    q = nf4.quantize(torch.randn(8, 64), 64)
    call = (lambda op, *a: op(*a)) if path == "eager" else (lambda op, *a: op.dispatch(*a))  # noqa: E731
    with pytest.raises(ValueError, match="x.*last dimension 64.*got shape \\[2, 63\\]"):
        call(nf4_ops.nf4_linear, torch.randn(2, 63), q, None)
    with pytest.raises(ValueError, match="bias.*shape \\[8\\]"):
        call(nf4_ops.nf4_linear, torch.randn(2, 64), q, torch.randn(7))
    with pytest.raises(TypeError, match="bias.*dtype"):
        call(nf4_ops.nf4_linear, torch.randn(2, 64), q, torch.randn(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="x"):
        call(nf4_ops.nf4_linear, torch.randn(2, 64, dtype=torch.float64), q, None)
    with pytest.raises(ValueError, match="packed.*bytes"):
        call(nf4_ops.nf4_dequantize, q.op_args()._replace(rows=9), torch.float32)  # rows: wrong packed size
    with pytest.raises(ValueError, match="nested_absmax"):
        call(nf4_ops.nf4_dequantize, q.op_args()._replace(nested_absmax=None), torch.float32)


def test_nf4_weight_is_checked_once_and_frozen():
    """An NF4Weight checks itself when built (the ops then skip that check per call) and cannot be changed after."""
    q = nf4.quantize(torch.randn(8, 64), 64)
    with pytest.raises(ValueError, match="packed.*bytes"):
        nf4.NF4Weight(q.packed[:-1], q.absmax, q.nested_absmax, q.nested_code, q.offset, 64, q.shape, q.dtype)
    with pytest.raises(ValueError, match="nested_absmax"):
        nf4.NF4Weight(q.packed, q.absmax, None, q.nested_code, q.offset, 64, q.shape, q.dtype)
    for field, v in (("packed", q.packed[:-1]), ("absmax", q.absmax.float()), ("rows", 9), ("shape", (9, 64)),
                     ("nested_absmax", None), ("blocksize", 32), ("offset", 0.0)):
        with pytest.raises(AttributeError, match=f"frozen.*{field}"):
            setattr(q, field, v)
    assert torch.equal(nf4_ops.nf4_linear(torch.eye(64), q, None), q.dequantize().T)  # unchanged
    for c in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):  # (torch.save / deepcopy of modules holding one)
        assert torch.equal(c.dequantize(), q.dequantize())
    q.dtype = torch.bfloat16  # the original / compute dtype is a label, not part of the packed weight
    assert q.dequantize().dtype == torch.bfloat16
    p = torch.empty(q.packed.numel(), 2, dtype=torch.uint8)
    p[:, 0] = q.packed.view(-1)
    w = nf4.NF4Weight(p[:, 0], q.absmax, q.nested_absmax, q.nested_code, q.offset, 64, q.shape, torch.float32)
    assert w.packed.is_contiguous() and torch.equal(w.dequantize(), q.dequantize(torch.float32))


def test_cpp_checks_reach_python():
    """The C++ API validates on its own (for C++ callers): errors come back as ValueError/TypeError."""
    q = nf4.quantize(torch.randn(8, 64), 64)
    out = torch.empty(8, 63)
    with pytest.raises(ValueError, match="out.*512 elements"):
        lorart._core._C.nf4_dequantize(q, out)
    with pytest.raises(ValueError, match="packed.*contiguous"):  # (lorart.ops.nf4 passes contiguous fields)
        p = torch.empty(q.packed.numel(), 2, dtype=torch.uint8)
        lorart._core._C.nf4_dequantize(q.op_args()._replace(packed=p[:, 0]), torch.empty(8, 64))
    with pytest.raises(TypeError, match="absmax.*must be a torch.Tensor"):
        lorart._core._C.nf4_dequantize(q.op_args()._replace(absmax=[1.0]), torch.empty(8, 64))
    with pytest.raises(TypeError):  # not an NF4 weight at all
        lorart._core._C.nf4_dequantize(q.packed, torch.empty(8, 64))
    with pytest.raises(ValueError, match="blocksize"):
        lorart._core._C.nf4_quantize(torch.ones(64), 100, torch.empty(32, dtype=torch.uint8), torch.empty(1))


@pytest.mark.cuda
def test_cpu_cuda_agree():
    from conftest import CUDA_SKIP
    if CUDA_SKIP:
        pytest.skip(CUDA_SKIP)
    for shape, bs, dtype, dq, xshape, has_bias in sample_inputs("cpu"):
        w = _w(shape, dtype, "cpu")
        pc, ac = torch.ops.lorart.nf4_quantize(w, bs)
        pg, ag = torch.ops.lorart.nf4_quantize(w.cuda(), bs)
        assert torch.equal(pc, pg.cpu()) and torch.equal(ac, ag.cpu())
        code = nf4.dynamic_map()
        off = ac.mean().reshape(1)  # the same offset on both (torch's mean may differ by an ulp per device)
        qa, na = torch.ops.lorart.nf4_double_quant(ac, off, code)
        qb, nb_ = torch.ops.lorart.nf4_double_quant(ac.cuda(), off.cuda(), code.cuda())
        assert torch.equal(qa, qb.cpu()) and torch.equal(na, nb_.cpu())
        qc, qg = nf4.quantize(w, bs, dq), nf4.quantize(w.cuda(), bs, dq)
        qg_on_cpu = qg.to("cpu")
        assert torch.equal(qg.dequantize().cpu(), qg_on_cpu.dequantize())  # same decode on both devices
        torch.testing.assert_close(qc.dequantize().float(), qg_on_cpu.dequantize().float(), atol=2e-3, rtol=1e-2)
        x = torch.randn(xshape, dtype=dtype)
        yc = nf4_ops.nf4_linear(x, qc, None)
        yg = nf4_ops.nf4_linear(x.cuda(), qg, None)
        torch.testing.assert_close(yc.float(), yg.float().cpu(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_gemv_vector_path(m, dtype):
    from conftest import CUDA_SKIP
    if CUDA_SKIP:
        pytest.skip(CUDA_SKIP)
    q = nf4.quantize(_w((96, 512), torch.float32, "cuda"), 64)  # cols % 32 == 0: 16-byte loads
    x = torch.randn(m, 512, device="cuda", dtype=dtype)
    b = torch.randn(96, device="cuda", dtype=dtype)
    y = nf4_ops.nf4_linear(x, q, b)
    ref = x.float() @ q.dequantize(torch.float32).T + b.float()
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


def test_linear_saves_no_full_precision_weight(device):
    """Autograd keeps only the packed weight (on the ctx, as a frozen input): no float tensor of the weight's size
    is saved."""
    q = nf4.quantize(_w((64, 96), torch.float32, device), 64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(20, 96, device=device, requires_grad=True)  # the dequantize + matmul path
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4_ops.nf4_linear(x, q, None)
    assert all(not (t.is_floating_point() and t.numel() >= 64 * 96) for t in saved), \
        [(t.dtype, tuple(t.shape)) for t in saved]
    y.sum().backward()
    assert x.grad is not None


def test_grad_input_opcheck_and_compile(device):
    q = nf4.quantize(_w((48, 64), torch.float32, device), 64)
    dy = torch.randn(3, 48, device=device)
    op = nf4_ops.nf4_linear_grad_input
    torch.library.opcheck(op.op, op.flatten((dy, q)))
    ref = dy @ q.dequantize()
    torch.testing.assert_close(op(dy, q), ref, atol=1e-5, rtol=1e-5)


def test_linear_under_torch_compile():
    q = nf4.quantize(torch.randn(32, 64) * 0.05, 64)

    def f(x):
        return nf4_ops.nf4_linear(x, q, None).relu().sum()  # the weight object, flattened into the op's fields

    x = torch.randn(5, 64, requires_grad=True)
    g_eager = torch.autograd.grad(f(x), x)[0]
    g_comp = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), x)[0]
    torch.testing.assert_close(g_eager, g_comp)
