"""torch.autocast: every lorart op and module against the equivalent plain-torch code under the same autocast.

Same output dtype; values within the rule of the other tests (our error against a float64 reference at most
2x that of the plain-torch code under the same autocast, plus a small floor); gradients reach fp32 master
weights in fp32. Eager (the fast path, which bypasses the dispatcher) and the dispatcher (torch.ops.lorart.*,
what torch.compile sees). CPU bf16 here; CUDA bf16/fp16 under the `cuda` marker (the same code path).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorart
from lorart import nf4
from lorart.ops import lora as L
from lorart.ops.act import swiglu
from lorart.ops.nf4 import nf4_linear
from lorart.ops.norm import rms_norm

from conftest import requires_cuda

CASES = [("cpu", torch.bfloat16),
         pytest.param("cuda", torch.bfloat16, marks=[requires_cuda, pytest.mark.cuda]),
         pytest.param("cuda", torch.float16, marks=[requires_cuda, pytest.mark.cuda])]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def close_as_torch(ours, theirs, exact, floor=1e-2):
    """ours and theirs (plain torch under the same autocast) in one dtype; ours no further from `exact`
    (float64, no autocast) than 2x theirs + floor * max|exact|."""
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    scale = exact.abs().max().item() if exact.numel() else 0.0
    assert _err(ours, exact) <= 2 * _err(theirs, exact) + floor * scale, (_err(ours, exact), _err(theirs, exact))


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in ts]


def run(fn, args, device, dtype, enabled=True):
    """fn(*args) under autocast, then backward of a fixed weighting of the output outside it: (out, grads)."""
    leaf = (torch.float32, torch.float64)
    args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype in leaf else a
            for a in args]
    with torch.autocast(device, dtype=dtype, enabled=enabled):
        out = fn(*args)
    w = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float32).view(out.shape)
    (out.float() * w).sum().backward()
    return out, [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def check_op(fn, ref, args, device, dtype):
    ours, g_ours = run(fn, args, device, dtype)
    theirs, g_theirs = run(ref, args, device, dtype)
    exact, g_exact = run(ref, [a.double() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                               for a in args], device, dtype, enabled=False)
    close_as_torch(ours, theirs, exact)
    assert len(g_ours) == len(g_theirs)
    for a, b, e in zip(g_ours, g_theirs, g_exact):
        assert a is not None and a.dtype == torch.float32  # fp32 master weights get fp32 gradients
        close_as_torch(a, b, e)


def _t(*shape, device):
    return torch.randn(*shape, device=device) / shape[-1] ** 0.25


# ---- ops ----------------------------------------------------------------------------------------------------

def ref_lora(x, W, b, A, B, s):
    return F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_lora_linear(device, dtype, M, path):
    W = _t(48, 64, device=device)  # the frozen base (no gradient, as in the op's contract)
    args = [_t(M, 64, device=device), _t(48, device=device), _t(8, 64, device=device), _t(48, 8, device=device)]
    if path == "eager":
        fn = lambda x, b, A, B: L.lora_linear(x, W.to(x.dtype), b, A, B, 0.5)  # noqa: E731
    else:
        fn = lambda x, b, A, B: torch.ops.lorart.lora_linear(x, W.to(x.dtype), b, A, B, 0.5, 0.0, 0)[0]  # noqa
    check_op(fn, lambda x, b, A, B: ref_lora(x, W.to(x.dtype), b, A, B, 0.5), args, device, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_lora_linear_nf4(device, dtype, M, path):
    w = nf4.quantize(torch.randn(48, 64, device=device), 64)
    Wd = w.dequantize(torch.float32)
    args = [_t(M, 64, device=device), _t(48, device=device), _t(8, 64, device=device), _t(48, 8, device=device)]
    if path == "eager":
        fn = lambda x, b, A, B: L.lora_linear_nf4(x, w, b, A, B, 0.5)  # noqa: E731
    else:
        fn = lambda x, b, A, B: L.lora_linear_nf4_op.dispatch(x, w, b, A, B, 0.5, 0.0, 0)[0]  # noqa: E731
    check_op(fn, lambda x, b, A, B: ref_lora(x, Wd.to(x.dtype), b, A, B, 0.5), args, device, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_nf4_linear(device, dtype, M, path):
    w = nf4.quantize(torch.randn(48, 64, device=device), 64)
    Wd = w.dequantize(torch.float32)
    fn = (lambda x, b: nf4_linear(x, w, b)) if path == "eager" else (lambda x, b: nf4_linear.dispatch(x, w, b))
    check_op(fn, lambda x, b: F.linear(x, Wd.to(x.dtype), b), [_t(M, 64, device=device), _t(48, device=device)],
             device, dtype)


def ref_rms(x, w, eps=1e-5):  # transformers' LlamaRMSNorm
    dt = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("xdt", ["float32", "autocast"])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_rms_norm(device, dtype, xdt, path):
    x = torch.randn(6, 40, device=device) * 3
    if xdt == "autocast":
        x = x.to(dtype)
    w = torch.randn(40, device=device)
    fn = (lambda x, w: rms_norm(x, w, 1e-5)) if path == "eager" else \
        (lambda x, w: torch.ops.lorart.rms_norm(x, w, 1e-5)[0])
    xs = x.detach().clone().requires_grad_(x.dtype == torch.float32)
    ws = w.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        ours = fn(xs, ws)
        theirs = ref_rms(x, w)
    assert ours.dtype == theirs.dtype
    exact = ref_rms(x.double(), w.double())
    close_as_torch(ours, theirs, exact)
    ours.float().sum().backward()
    assert ws.grad is not None and ws.grad.dtype == torch.float32


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("path", ["eager", "op"])
def test_swiglu(device, dtype, path):
    fn = swiglu if path == "eager" else torch.ops.lorart.swiglu
    g, u = torch.randn(5, 33, device=device), torch.randn(5, 33, device=device)
    for a, b in ((g, u), (g.to(dtype), u.to(dtype)), (g.to(dtype), u)):  # mixed: promoted, as silu(g) * u is
        with torch.autocast(device, dtype=dtype):
            ours, theirs = fn(a, b), F.silu(a) * b
        assert ours.dtype == theirs.dtype
        close_as_torch(ours, theirs, F.silu(a.double()) * b.double())


@pytest.mark.parametrize("device,dtype", CASES)
def test_lora_grouped_add_in_the_output_dtype(device, dtype):
    M, K, N = 6, 20, 12
    y = torch.randn(M, N, device=device).to(dtype)       # a base output under autocast
    x = torch.randn(M, K, device=device)                 # fp32 activations
    A, B = torch.randn(2, 4, K, device=device), torch.randn(2, N, 4, device=device)
    ranks = torch.tensor([4, 4], dtype=torch.int32, device=device)
    scales = torch.tensor([0.5, 2.0], device=device)
    idx = torch.tensor([0, 1, -1, 1, 0, 0], device=device)
    want = y.double().clone()
    for m in range(M):
        if idx[m] >= 0:
            i = int(idx[m])
            want[m] += scales[i].double() * (B[i].double() @ (A[i].double() @ x[m].double()))
    with torch.autocast(device, dtype=dtype):
        out = y.clone()
        torch.ops.lorart.lora_grouped_add_(out, x, A, B, ranks, scales, idx)
    assert out.dtype == dtype
    assert _err(out, want) <= 3e-2 * want.abs().max().item()


@pytest.mark.parametrize("device,dtype", CASES)
def test_merge_and_dropout_keep_their_dtypes(device, dtype):
    W, A, B = torch.randn(8, 16, device=device), torch.randn(4, 16, device=device), torch.randn(8, 4, device=device)
    want = W + 0.5 * B @ A
    with torch.autocast(device, dtype=dtype):
        torch.ops.lorart.lora_merge_(W, A, B, 0.5)
        x = torch.randn(4, 16, device=device)
        d = torch.ops.lorart.lora_dropout(x, 0.25, 3)
    torch.testing.assert_close(W, want)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, torch.ops.lorart.lora_dropout(x, 0.25, 3))


def test_compiled_equals_eager_under_autocast():
    """rms_norm -> LoRA (dense) -> swiglu -> NF4 linear under autocast, torch.compile(fullgraph=True) vs eager."""
    w4 = nf4.quantize(torch.randn(32, 48), 64)
    W, b, A, B = torch.randn(96, 32), torch.randn(96), torch.randn(4, 32), torch.randn(96, 4) * 0.1
    nw = torch.randn(32)

    def f(x, A, B):
        h = rms_norm(x, nw, 1e-5)
        y = L.lora_linear(h, W, b, A, B, 2.0)
        g = swiglu(y[:, :48], y[:, 48:])
        return nf4_linear(g, w4, None)

    x = torch.randn(5, 32)
    outs = []
    for fn in (f, torch.compile(f, fullgraph=True, dynamic=False)):
        a, bb = A.clone().requires_grad_(), B.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, a, bb)
        y.float().sum().backward()
        outs.append((y, a.grad, bb.grad))
    (y0, a0, b0), (y1, a1, b1) = outs
    assert y0.dtype == y1.dtype == torch.bfloat16 and a0.dtype == a1.dtype == torch.float32
    torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a1, a0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b1, b0, rtol=2e-2, atol=2e-2)


# ---- modules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,dtype", CASES)
def test_issue_repro_lora_module_under_autocast(device, dtype):
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)).to(device)
    lorart.inject(m, targets=["1"], r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        m[1].lora_B["default"].weight.normal_()
    with torch.autocast(device, dtype=dtype):
        y = m(torch.randn(8, 64, device=device))
    assert y.dtype == dtype
    y.float().sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lora_module_matches_peft_under_autocast(quantize):
    """Output dtype, values and LoRA gradients against PEFT (over bitsandbytes' Linear4bit for NF4)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    ours = nn.Sequential(nn.Linear(64, 48))
    ours[0].load_state_dict(lin.state_dict())
    lorart.inject(ours, targets=["0"], r=8, alpha=16, dropout=0.0, quantize=quantize)
    if quantize:
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")
        base.load_state_dict(lin.state_dict())
        base = base.to("cpu")
    else:
        base = nn.Linear(64, 48)
        base.load_state_dict(lin.state_dict())
    theirs = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    tl = theirs.base_model.model[0]
    with torch.no_grad():
        tl.lora_B["default"].weight.normal_()
        ours[0].lora_A["default"].weight.copy_(tl.lora_A["default"].weight)
        ours[0].lora_B["default"].weight.copy_(tl.lora_B["default"].weight)
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yo, yt = ours(x), theirs(x)
    assert yo.dtype == yt.dtype == (torch.float32 if quantize else torch.bfloat16)
    torch.testing.assert_close(yo.float(), yt.float(), rtol=3e-2, atol=3e-2)
    yo.float().square().sum().backward()
    yt.float().square().sum().backward()
    for k in ("lora_A", "lora_B"):
        go, gt = getattr(ours[0], k)["default"].weight.grad, getattr(tl, k)["default"].weight.grad
        assert go.dtype == gt.dtype == torch.float32
        assert (go - gt).norm() <= 3e-2 * gt.norm()
