"""torch.ops.lorart.lora_*: against the PEFT formula in plain PyTorch, gradients, opcheck, CPU vs CUDA."""
from __future__ import annotations

import pytest
import torch

from lorart.ops import lora as L
from lorart.ops.nf4 import NF4Args

from conftest import requires_cuda
from lora_ref import nf4_quantize_ref, nf4_dequantize_ref

HAS_NF4_OP = hasattr(torch.ops.lorart, "nf4_dequantize")


@pytest.fixture(params=["never", "always"])
def policy(request):
    old = L.set_fused_policy(request.param)
    yield request.param
    L.set_fused_policy(old)


def ref_lora(x, W, b, A, B, s, p=0.0, seed=0):
    """PEFT: base(x) + lora_B(lora_A(dropout(x))) * scaling, in float64 math; the mask is lorart's."""
    if p == 0:
        xd = x
    else:  # the mask depends on (seed, index) only: take it from the CPU op on ones
        keep = L.lora_dropout(torch.ones(x.shape), p, seed).ne(0).to(device=x.device, dtype=x.dtype)
        xd = keep * x / (1 - p)
    y = x @ W.t() + (b if b is not None else 0)
    return y + (xd @ A.t()) @ B.t() * s


def make(M, K, N, r, dtype=torch.float32, device="cpu", bias=True):
    g = torch.Generator().manual_seed(M * 1000 + K + N + r)
    t = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype).to(device)  # noqa: E731
    return t(M, K), t(N, K), (t(N) if bias else None), t(r, K), t(N, r)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,bias,p", [(1, True, 0.0), (5, False, 0.1), (16, True, 0.0), (40, True, 0.2)])
def test_forward_matches_peft_formula(device, policy, dtype, M, bias, p):
    x, W, b, A, B = make(M, 64, 48, 8, dtype, device, bias)
    y = L.lora_linear(x, W, b, A, B, 2.0, p, 123)
    ref = ref_lora(*(t.double() if t is not None else None for t in (x, W, b, A, B)), 2.0, p, 123)
    # our error at most ~2x torch's own error in the same precision (both against float64)
    torch_y = ref_lora(x, W, b, A, B, 2.0, p, 123)
    bound = 2 * (torch_y.double() - ref).abs().max().item() + tol(dtype)
    assert (y.double() - ref).abs().max().item() <= bound
    assert y.dtype == dtype and y.shape == (M, 48)


def test_forward_3d_input_and_strided(policy):
    x, W, b, A, B = make(6, 32, 16, 4)
    x3 = torch.randn(2, 3, 64)[..., ::2]  # non-unit last stride: copied
    y = L.lora_linear(x3, W, b, A, B, 0.5)
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y, ref_lora(x3, W, b, A, B, 0.5), rtol=1e-5, atol=1e-5)


def test_dropout_mask_properties():
    x = torch.ones(64, 256)
    d = L.lora_dropout(x, 0.25, 11)
    assert abs((d == 0).float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(d[d != 0], torch.full_like(d[d != 0], 1 / 0.75))
    assert torch.equal(d, L.lora_dropout(x, 0.25, 11))          # recomputable from the seed
    assert not torch.equal(d, L.lora_dropout(x, 0.25, 12))      # and seed-dependent
    assert torch.equal(L.lora_dropout(x, 0.0, 5), x)
    with pytest.raises(ValueError, match="dropout"):
        L.lora_dropout(x, 1.0, 0)


def _via_op(*args):
    return torch.ops.lorart.lora_linear(*args)[0]


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_autograd_reference(policy, p, bias, path):
    fn = L.lora_linear if path == "eager" else _via_op
    x, W, b, A, B = make(7, 24, 20, 4, torch.float64, bias=bias)
    for t in (x, A, B) + ((b,) if bias else ()):
        t.requires_grad_(True)
    gy = torch.randn(7, 20, dtype=torch.float64)
    y = fn(x, W, b, A, B, 1.5, p, 9)
    got = torch.autograd.grad(y, [t for t in (x, A, B, b) if t is not None], gy)
    ref = ref_lora(x, W, b, A, B, 1.5, p, 9)
    exp = torch.autograd.grad(ref, [t for t in (x, A, B, b) if t is not None], gy)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_no_weight_grad_and_gradcheck(policy):
    x, W, b, A, B = make(3, 10, 6, 2, torch.float64)
    W.requires_grad_(True)  # a frozen base never gets a gradient from the op
    for t in (x, b, A, B):
        t.requires_grad_(True)
    y = L.lora_linear(x, W, b, A, B, 0.7, 0.2, 4)
    assert y.grad_fn is not None
    f = lambda x, b, A, B: L.lora_linear(x, W.detach(), b, A, B, 0.7, 0.2, 4)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, b, A, B))
    g = lambda x, b, A, B: _via_op(x, W.detach(), b, A, B, 0.7, 0.2, 4)  # noqa: E731
    assert torch.autograd.gradcheck(g, (x, b, A, B))


def test_bad_arguments_raise_clear_errors():
    x, W, b, A, B = make(4, 16, 8, 2)
    with pytest.raises(ValueError, match="`B`: expected \\[8, 2\\]"):
        L.lora_linear(x, W, b, A, B.t(), 1.0)
    with pytest.raises(ValueError, match="`x`: expected \\[..., 16\\]"):
        L.lora_linear(x[:, :8], W, b, A, B, 1.0)
    with pytest.raises(TypeError, match="`A`: expected dtype torch.float32"):
        L.lora_linear(x, W, b, A.double(), B, 1.0)
    with pytest.raises(ValueError, match="dropout"):
        L.lora_linear(x, W, b, A, B, 1.0, 1.5)
    with pytest.raises(ValueError, match="rank"):
        L.lora_scale(16, 0)


# ---- NF4 base (fused small-M kernel; the large-M path needs lorart.ops.nf4) -----------------------------------

@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("K,bs", [(64, 64), (96, 64), (40, 32)])
def test_nf4_fused_matches_dequantized_reference(device, dq, K, bs):
    N, r, M = 24, 4, 3
    W = torch.randn(N, K)
    q = nf4_quantize_ref(W, bs, dq)
    x, _, b, A, B = make(M, K, N, r, torch.bfloat16)
    old = L.set_fused_policy("always")
    try:
        w = NF4Args(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in q))
        y = L.lora_linear_nf4(x.to(device), w, b.to(device), A.to(device), B.to(device), 2.0)
    finally:
        L.set_fused_policy(old)
    Wd = nf4_dequantize_ref(q).to(torch.bfloat16)
    ref = ref_lora(x.double(), Wd.double(), b.double(), A.double(), B.double(), 2.0)
    assert (y.cpu().double() - ref).abs().max().item() < 3e-2 * ref.abs().max().item()


@pytest.mark.skipif(not HAS_NF4_OP, reason="lorart.ops.nf4 (nf4_dequantize) is not in this tree yet")
def test_nf4_large_m_and_backward_match_dense():
    N, K, r, M = 16, 64, 4, 40
    q = nf4_quantize_ref(torch.randn(N, K), 64, True)
    Wd = nf4_dequantize_ref(q)
    x, _, b, A, B = make(M, K, N, r)
    for t in (x, A, B):
        t.requires_grad_(True)
    ref = L.lora_linear(x, Wd, b, A, B, 2.0, 0.1, 5)
    e = torch.autograd.grad(ref.sum(), (x, A, B))
    for y in (L.lora_linear_nf4(x, q, b, A, B, 2.0, 0.1, 5),
              L.lora_linear_nf4_op.dispatch(x, q, b, A, B, 2.0, 0.1, 5)[0]):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(y.sum(), (x, A, B))
        for a, c in zip(g, e):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# ---- grouped (mixed-adapter) -----------------------------------------------------------------------------------

def grouped_inputs(M, K, N, ranks, dtype=torch.float32, device="cpu"):
    rmax = max(ranks)
    As = torch.zeros(len(ranks), rmax, K, dtype=dtype)
    Bs = torch.zeros(len(ranks), N, rmax, dtype=dtype)
    for i, r in enumerate(ranks):
        As[i, :r] = torch.randn(r, K).to(dtype)
        Bs[i, :, :r] = torch.randn(N, r).to(dtype)
    idx = torch.tensor([(m % (len(ranks) + 1)) - 1 for m in range(M)], dtype=torch.int64)
    scales = torch.tensor([0.5 + i for i in range(len(ranks))], dtype=torch.float32)
    x = torch.randn(M, K).to(dtype)
    dev = lambda t: t.to(device)  # noqa: E731
    return dev(x), dev(As), dev(Bs), dev(torch.tensor(ranks, dtype=torch.int32)), dev(scales), dev(idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_per_adapter_runs(device, dtype):
    M, K, N, ranks = 11, 40, 24, [4, 2, 8]
    x, As, Bs, rk, sc, idx = grouped_inputs(M, K, N, ranks, dtype, device)
    W = torch.randn(N, K).to(dtype).to(device)
    y = x @ W.t()
    base = y.clone()
    torch.ops.lorart.lora_grouped_add_(y, x, As, Bs, rk, sc, idx)
    for m in range(M):
        a = int(idx[m])
        if a < 0:
            assert torch.equal(y[m], base[m])
            continue
        r = ranks[a]
        exp = L.lora_linear(x[m:m + 1], W, None, As[a, :r], Bs[a, :, :r], float(sc[a]))
        torch.testing.assert_close(y[m:m + 1], exp, rtol=tol(dtype), atol=tol(dtype) * 4)


def test_grouped_bad_index_raises():
    x, As, Bs, rk, sc, idx = grouped_inputs(4, 8, 6, [2, 2])
    idx[1] = 2
    with pytest.raises(ValueError, match="adapter_idx\\[1\\] = 2"):
        torch.ops.lorart.lora_grouped_add_(torch.zeros(4, 6), x, As, Bs, rk, sc, idx)
    with pytest.raises(ValueError, match="one per row"):
        torch.ops.lorart.lora_grouped_add_(torch.zeros(4, 6), x, As, Bs, rk, sc, idx[:3])


# ---- merge ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_is_one_rounding_of_the_exact_sum(device, dtype):
    W = torch.randn(20, 36).to(dtype)
    A, B = torch.randn(4, 36).to(dtype), torch.randn(20, 4).to(dtype)
    exp = (W.double() + 0.25 * B.double() @ A.double()).to(dtype)
    Wd = W.to(device)
    torch.ops.lorart.lora_merge_(Wd, A.to(device), B.to(device), 0.25)
    # float32 accumulation may flip the final rounding of a few elements by one ulp
    diff = (Wd.cpu().double() - exp.double()).abs()
    ulp = exp.double().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10 if dtype == torch.float16
                                else 2.0 ** -23)
    acc_err = 8 * 2.0 ** -24 * (W.double().abs() + 0.25 * B.double().abs() @ A.double().abs())
    assert (diff <= ulp + acc_err).all()
    torch.ops.lorart.lora_unmerge_(Wd, A.to(device), B.to(device), 0.25)
    torch.testing.assert_close(Wd.cpu().float(), W.float(), rtol=0, atol=tol(dtype) * 10)


def test_merge_nonfinite_count(device):
    W = torch.randn(8, 8, dtype=torch.float16, device=device)
    A = torch.full((2, 8), 300.0, dtype=torch.float16, device=device)
    B = torch.full((8, 2), 300.0, dtype=torch.float16, device=device)
    assert int(torch.ops.lorart.lora_merge_nonfinite(W, A, B, 1.0)) == 64      # 180000 > fp16 max
    assert int(torch.ops.lorart.lora_merge_nonfinite(W, A, B, 1e-5)) == 0


# ---- CPU vs CUDA -----------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("M", [1, 3, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_cuda_agree(M, dtype):
    x, W, b, A, B = make(M, 256, 72, 16, dtype)
    old = L.set_fused_policy("always")
    try:
        yc = L.lora_linear(x, W, b, A, B, 2.0, 0.1, 77)
        yg = L.lora_linear(*(t.cuda() for t in (x, W, b, A, B)), 2.0, 0.1, 77)
    finally:
        L.set_fused_policy(old)
    torch.testing.assert_close(yg.cpu(), yc, rtol=tol(dtype), atol=tol(dtype))
    assert torch.equal(L.lora_dropout(x.cuda(), 0.3, 5).cpu(), L.lora_dropout(x, 0.3, 5))


def test_torch_compile_fullgraph_matches_eager():
    x, W, b, A, B = make(5, 32, 24, 4)
    A.requires_grad_(True)
    B.requires_grad_(True)
    f = torch.compile(lambda x, A, B: L.lora_linear(x, W, b, A, B, 2.0, 0.1, 7), fullgraph=True)
    y, ye = f(x, A, B), L.lora_linear(x, W, b, A, B, 2.0, 0.1, 7)
    torch.testing.assert_close(y, ye, rtol=0, atol=0)
    g = torch.autograd.grad(y.square().sum(), (A, B))
    ge = torch.autograd.grad(ye.square().sum(), (A, B))
    for a, c in zip(g, ge):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


# ---- eager paths: no-grad impl, argument checks, double backward -------------------------------------------------

def nf4_args(N, K, device="cpu"):
    q = nf4_quantize_ref(torch.randn(N, K, generator=torch.Generator().manual_seed(N + K)), 64, True)
    return NF4Args(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("M", [1, 3, 40])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_no_grad_path_equals_autograd_path_bitwise(device, policy, base, M, p, dtype):
    x, W, b, A, B = make(M, 64, 48, 8, dtype, device)
    w = W if base == "dense" else nf4_args(48, 64, device)
    fn = L.lora_linear if base == "dense" else L.lora_linear_nf4
    op = L.lora_linear_dense if base == "dense" else L.lora_linear_nf4_op
    with torch.no_grad():
        y0 = fn(x, w, b, A, B, 1.5, p, 17)
    assert y0.grad_fn is None
    y1 = fn(x, w, b, A.clone().requires_grad_(True), B, 1.5, p, 17)  # through the autograd.Function
    assert y1.grad_fn is not None and torch.equal(y1.detach(), y0)
    y2 = fn(x, w, b, A, B, 1.5, p, 17)  # grad mode, nothing requires grad: the impl, no graph
    assert y2.grad_fn is None and torch.equal(y2, y0)
    assert torch.equal(op.dispatch(x, w, b, A, B, 1.5, p, 17)[0], y0)  # the dispatcher op (torch.compile's path)


def _raised(fn, *args):
    try:
        fn(*args)
    except (ValueError, TypeError, RuntimeError) as e:
        return type(e), str(e)
    return None


def _bad_cases(x, W, b, A, B):
    meta = lambda t: t.to("meta")  # noqa: E731
    return {"weight 1-d": dict(W=W[0]), "weight dtype": dict(W=W.double()), "weight device": dict(W=meta(W)),
            "x int": dict(x=x.int()), "x 0-d": dict(x=x[0, 0]), "x columns": dict(x=x[:, :8]),
            "x float64": dict(x=x.double()), "A dtype": dict(A=A.half()), "B dtype": dict(B=B.half()),
            "bias dtype": dict(b=b.half()), "A 1-d": dict(A=A[0]), "A columns": dict(A=A[:, :8]),
            "B transposed": dict(B=B.t()), "B rank": dict(B=B[:, :1]), "bias shape": dict(b=b[:3]),
            "A device": dict(A=meta(A)), "B device": dict(B=meta(B)), "bias device": dict(b=meta(b)),
            "p 1.5": dict(p=1.5), "p -0.1": dict(p=-0.1), "p nan": dict(p=float("nan"))}


def _entry_points(op, public):
    """The three ways into an op: the eager path, the dispatcher (real kernel), the dispatcher on meta tensors
    (the fake kernel, as torch.compile traces): each must give the one check's error."""
    def on_meta(*a):
        op(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in a))
    return [public, op, on_meta]


@pytest.mark.parametrize("case", list(_bad_cases(*make(4, 16, 8, 2)[:5])))
def test_bad_arguments_raise_one_clear_error_on_every_path(case):
    """Every bad argument raises an error naming it, the same from the eager path, the dispatcher and the fake
    kernel (one set of checks)."""
    x, W, b, A, B = make(4, 64, 48, 2)
    kw = dict(x=x, W=W, b=b, A=A, B=B, p=0.1)
    kw.update(_bad_cases(x, W, b, A, B)[case])
    paths = _entry_points(torch.ops.lorart.lora_linear, L.lora_linear)
    errs = {_raised(f, kw["x"], kw["W"], kw["b"], kw["A"], kw["B"], 1.0, kw["p"], 0) for f in paths[:2]}
    assert len(errs) == 1 and None not in errs, errs
    (kind, msg), = errs
    assert msg.startswith("lorart: argument") or "lorart:" in msg
    if "device" not in case:  # (meta tensors everywhere: no device mismatch left to find)
        assert _raised(paths[2], kw["x"], kw["W"], kw["b"], kw["A"], kw["B"], 1.0, kw["p"], 0) == (kind, msg)
    if case.startswith("weight"):
        return
    q = nf4_args(48, 64)
    paths = [lambda x, b, A, B, p: L.lora_linear_nf4(x, q, b, A, B, 1.0, p),
             lambda x, b, A, B, p: L.lora_linear_nf4_op.dispatch(x, q, b, A, B, 1.0, p, 0)[0]]
    errs = {_raised(f, kw["x"], kw["b"], kw["A"], kw["B"], kw["p"]) for f in paths}
    assert len(errs) == 1 and None not in errs, errs


@pytest.mark.parametrize("case", ["packed dtype", "absmax dtype", "packed bytes", "packed device"])
def test_nf4_weight_errors_on_every_path(case):
    x, _, b, A, B = make(4, 64, 48, 2)
    q = nf4_args(48, 64)
    q = {"packed dtype": q._replace(packed=q.packed.int()), "absmax dtype": q._replace(absmax=q.absmax.double()),
         "packed bytes": q._replace(packed=q.packed[:-1]),
         "packed device": q._replace(packed=q.packed.to("meta"))}[case]
    errs = {_raised(L.lora_linear_nf4, x, q, b, A, B, 1.0, 0.1),
            _raised(L.lora_linear_nf4_op.dispatch, x, q, b, A, B, 1.0, 0.1, 0)}
    assert len(errs) == 1 and None not in errs, errs
    assert next(iter(errs))[1].startswith("lorart: argument")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_create_graph_keeps_once_differentiable(p):
    x, W, b, A, B = make(5, 16, 8, 2, torch.float64)
    A.requires_grad_(True)
    x.requires_grad_(True)
    gA, = torch.autograd.grad(L.lora_linear(x, W, b, A, B, 2.0, p, 3).square().sum(), A)
    gA2, = torch.autograd.grad(L.lora_linear(x, W, b, A, B, 2.0, p, 3).square().sum(), A, create_graph=True)
    torch.testing.assert_close(gA2.detach(), gA, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gA2.sum().backward()
