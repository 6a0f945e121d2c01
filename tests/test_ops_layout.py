"""Tensor lifetimes and layouts at the boundary to lorart._C.

Every tensor argument of every op, given strided / transposed / sliced / stride-0 / storage-offset, gives the
result of its contiguous copy (or a clear error naming the argument): a kernel never reads a temporary that was
freed before it ran. CI runs this file once more with MALLOC_PERTURB_ set, so that a freed buffer reads as
garbage instead of as the values it happened to still hold.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lorart
from lorart import nf4
from lorart.ops import lora as L
from lorart.ops import nf4 as N
from lorart.ops.act import swiglu
from lorart.ops.norm import rms_norm


def layouts(t: torch.Tensor):
    """(name, tensor) pairs: t's values (or, for stride 0, a broadcast of its first slice) in other layouts."""
    out = []
    if t.dim() >= 2:
        out.append(("transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)))
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device) if t.dim() else None
    if big is not None:
        big[..., 1::2].copy_(t)
        out.append(("sliced", big[..., 1::2]))
    flat = torch.empty(t.numel() + 5, dtype=t.dtype, device=t.device)
    off = flat[5:].view(t.shape)
    off.copy_(t)
    out.append(("offset", off))
    if t.dim() >= 1 and t.shape[0] > 1:
        out.append(("stride0", t[:1].clone().expand_as(t)))
    return out


def _clone(a):
    return a.clone() if isinstance(a, torch.Tensor) else [x.clone() for x in a] if isinstance(a, list) else a


def _equal(a, b):
    if isinstance(a, (tuple, list)):
        return all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if torch.equal(a, b):
            return True  # (a GEMM may sum in another order for other strides: float rounding only)
        scale = b.abs().max().item() if b.numel() else 0.0
        return a.dtype.is_floating_point and torch.allclose(a, b, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)
    return a == b


def check_layouts(fn, args, which, mutated=()):
    """For each index in `which`, each layout of args[i]: fn gives what it gives on the contiguous copy (outputs
    and the mutated arguments), or raises a ValueError naming a contiguity/stride requirement."""
    for i in which:
        for name, v in layouts(args[i]):
            base = [_clone(a) for a in args]
            base[i] = v.contiguous()
            got = [_clone(a) for a in args]
            got[i] = v
            if i in mutated and 0 not in v.stride():  # in place: the same strides over storage of its own
                got[i] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v)
            try:
                out = fn(*got)
            except ValueError as e:
                assert "contiguous" in str(e) or "stride" in str(e), (i, name, e)
                continue
            ref = fn(*base)
            assert _equal(out, ref), (i, name)
            for j in mutated:
                assert _equal(got[j], base[j]), (i, name, j)


def _nf4w(rows=24, cols=80, dq=True):
    return nf4.quantize(torch.randn(rows, cols), blocksize=64, double_quant=dq)


# ---- the repros of issue 11 (in a subprocess: they crashed the process) ------------------------------------------

REPROS = {
    "lora_merge_": "W=torch.randn(16,1<<20); A=torch.randn(1<<20,16).t(); B=torch.randn(16,16); ref=W+2.0*B@A; "
                   "torch.ops.lorart.lora_merge_(W, A, B, 2.0); print(float((W-ref).abs().max()))",
    "rms_norm": "x=torch.randn(4,4096); w=torch.randn(8192)[::2]; y,_=torch.ops.lorart.rms_norm(x, w, 1e-6); "
                "print(float((y - w*(x*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+1e-6))).abs().max()))",
    "nf4_dequantize": "w=lorart.nf4.quantize(torch.randn(64,256), 64, False); p=torch.empty(w.packed.numel(),2,"
                      "dtype=torch.uint8); p[:,0]=w.packed.view(-1); o=w.op_args(); "
                      "y=torch.ops.lorart.nf4_dequantize(p[:,0], *o[1:], torch.float32); "
                      "print(float((y-w.dequantize()).abs().max()))",
}


def test_issue_repros_in_a_subprocess():
    """The issue's repros, in one fresh process with freed memory poisoned (they crashed or read garbage)."""
    code = "import torch, lorart\n" + "\n".join(f"{v}  # {k}" for k, v in sorted(REPROS.items()))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MALLOC_PERTURB_="165"))
    assert r.returncode == 0, r.stderr[-2000:]
    errs = [float(v) for v in r.stdout.split()]
    assert len(errs) == len(REPROS) and max(errs) < 1e-3, dict(zip(sorted(REPROS), errs))


# ---- every op, every tensor argument ------------------------------------------------------------------------------

def test_rms_norm_layouts():
    x, w = torch.randn(6, 40), torch.randn(40)
    check_layouts(lambda x, w: rms_norm(x, w, 1e-5), [x, w], [0, 1])
    check_layouts(lambda x, w: torch.ops.lorart.rms_norm(x, w, 1e-5), [x, w], [0, 1])
    y, rstd = torch.ops.lorart.rms_norm(x, w, 1e-5)
    check_layouts(lambda x, w, r, g: torch.ops.lorart.rms_norm_backward(x, w, r, g), [x, w, rstd, torch.randn(6, 40)],
                  [0, 1, 2, 3])


def test_swiglu_layouts():
    g, u = torch.randn(5, 33), torch.randn(5, 33)
    check_layouts(swiglu, [g, u], [0, 1])
    check_layouts(torch.ops.lorart.swiglu, [g, u], [0, 1])
    check_layouts(torch.ops.lorart.swiglu_backward, [g, u, torch.randn(5, 33)], [0, 1, 2])


@pytest.mark.parametrize("policy", ["never", "always"])
@pytest.mark.parametrize("M", [1, 7, 20])
def test_lora_linear_layouts(policy, M):
    old = L.set_fused_policy(policy)
    try:
        x, W, b, A, B = torch.randn(M, 48), torch.randn(24, 48), torch.randn(24), torch.randn(4, 48), torch.randn(24, 4)
        check_layouts(lambda *a: L.lora_linear(*a, 0.5, 0.1, 7), [x, W, b, A, B], range(5))
        check_layouts(lambda *a: torch.ops.lorart.lora_linear(*a, 0.5, 0.1, 7), [x, W, b, A, B], range(5))
        w = _nf4w(24, 48)
        o = w.op_args()
        fn = lambda x, p, am, na, nc, b, A, B: L.lora_linear_nf4(x, p, am, na, nc, *o[4:], b, A, B, 0.5, 0.1, 7)  # noqa
        check_layouts(fn, [x, o[0], o[1], o[2], o[3], b, A, B], range(8))
        fn = lambda x, p, am, na, nc, b, A, B: torch.ops.lorart.lora_linear_nf4(  # noqa: E731
            x, p, am, na, nc, *o[4:], b, A, B, 0.5, 0.1, 7)
        check_layouts(fn, [x, o[0], o[1], o[2], o[3], b, A, B], range(8))
    finally:
        L.set_fused_policy(old)


def test_lora_dropout_layouts():
    check_layouts(lambda x: torch.ops.lorart.lora_dropout(x, 0.3, 5), [torch.randn(6, 20)], [0])


def test_lora_merge_layouts():
    W, A, B = torch.randn(20, 36), torch.randn(4, 36), torch.randn(20, 4)
    check_layouts(lambda W, A, B: torch.ops.lorart.lora_merge_(W, A, B, 0.7), [W, A, B], [0, 1, 2], mutated=(0,))
    check_layouts(lambda W, A, B: torch.ops.lorart.lora_unmerge_(W, A, B, 0.7), [W, A, B], [0, 1, 2], mutated=(0,))
    check_layouts(lambda W, A, B: torch.ops.lorart.lora_merge_nonfinite(W, A, B, 0.7), [W, A, B], [0, 1, 2])


def test_lora_grouped_add_layouts():
    M, K, N, Lr, R = 6, 20, 12, 3, 4
    args = [torch.randn(M, N), torch.randn(M, K), torch.randn(Lr, R, K), torch.randn(Lr, N, R),
            torch.tensor([4, 2, 3], dtype=torch.int32), torch.tensor([0.5, 1.0, 2.0]),
            torch.tensor([0, 2, -1, 1, 1, 0], dtype=torch.int64)]
    check_layouts(torch.ops.lorart.lora_grouped_add_, args, range(7), mutated=(0,))


def test_nf4_ops_layouts():
    w = torch.randn(16, 96)
    check_layouts(lambda w: torch.ops.lorart.nf4_quantize(w, 64), [w], [0])
    packed, absmax = torch.ops.lorart.nf4_quantize(w, 64)
    code = nf4.dynamic_map()
    check_layouts(lambda a, o, c: torch.ops.lorart.nf4_double_quant(a, o, c), [absmax, absmax.mean().reshape(1), code],
                  [0, 2])
    for dq in (False, True):
        o = _nf4w(16, 96, dq).op_args()
        idx = [0, 1] + ([2, 3] if dq else [])
        check_layouts(lambda p, a, na, nc: torch.ops.lorart.nf4_dequantize(p, a, na, nc, *o[4:], torch.float32),
                      list(o[:4]), idx)
        for M in (1, 40):
            x, b = torch.randn(M, 96), torch.randn(16)
            check_layouts(lambda x, p, a, na, nc, b: torch.ops.lorart.nf4_linear(x, p, a, na, nc, *o[4:], b),
                          [x, *o[:4], b], [0, 5] + [i + 1 for i in idx])
            check_layouts(lambda x, p, a, na, nc, b: N.nf4_linear_eager(x, p, a, na, nc, *o[4:], b),
                          [x, *o[:4], b], [0, 5] + [i + 1 for i in idx])
            check_layouts(lambda g, p, a, na, nc: torch.ops.lorart.nf4_linear_grad_input(g, p, a, na, nc, *o[4:]),
                          [torch.randn(M, 16), *o[:4]], [0] + [i + 1 for i in idx])


def test_adamw_layouts_are_errors_or_equal():
    p, g = torch.randn(8, 6), torch.randn(8, 6)
    m, v = torch.zeros(8, 6), torch.zeros(8, 6)

    def step(p, g, m, v):
        torch.ops.lorart.adamw_step_([p], [g], [m], [v], [1], 1e-2, 0.9, 0.999, 1e-8, 0.01)
        return p
    check_layouts(step, [p, g, m, v], [0, 1, 2, 3], mutated=(0, 2, 3))


# ---- the boundary itself ---------------------------------------------------------------------------------------

def test_core_takes_tensors_and_checks_layout():
    C = lorart._core._C
    x = torch.randn(8, 6)
    out = torch.empty(8, 6)
    C.lora_dropout(x, out, 0.0, 0, 0)
    assert torch.equal(out, x)
    with pytest.raises(ValueError, match="argument `x`: expected unit stride"):
        C.lora_dropout(x.t(), torch.empty(6, 8), 0.0, 0, 0)
    with pytest.raises(ValueError, match="argument `weight`: expected a contiguous tensor"):
        C.rms_norm(x, torch.randn(12)[::2], 1e-6, out, torch.empty(8), 0)
    with pytest.raises(TypeError):
        C.lora_dropout((x.data_ptr(), 0, (8, 6), (6, 1), 0, 0), out, 0.0, 0, 0)  # a bare pointer is refused
    with pytest.raises(TypeError, match="complex64"):
        C.lora_dropout(torch.zeros(2, 2, dtype=torch.complex64), out, 0.0, 0, 0)
    with pytest.raises(ValueError, match="meta"):
        C.lora_dropout(torch.zeros(2, 2, device="meta"), out, 0.0, 0, 0)


def test_zero_size_any_strides_is_contiguous():
    x = torch.empty(5, 0).t()  # strides (1, 5): contiguous to torch (no elements)
    assert x.is_contiguous()
    y = rms_norm(torch.empty(0, 8), torch.randn(8))
    assert y.shape == (0, 8)
    g = swiglu(x, torch.empty(0, 5))
    assert g.shape == (0, 5)
