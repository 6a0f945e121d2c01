"""torch.ops.lorart.rms_norm against transformers' LlamaRMSNorm arithmetic in plain PyTorch: outputs, gradients,
opcheck, saved tensors, CPU vs CUDA, the model's norms."""
import pytest
import torch
from conftest import requires_cuda

from lorart.ops.norm import rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(x, w, eps):
    """LlamaRMSNorm.forward (transformers), written out."""
    dtype = x.dtype
    xf = x.float() if dtype != torch.float64 else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dtype)


def sample_inputs(device="cpu", dtype=torch.float32, shape=(7, 33), requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(device).requires_grad_(requires_grad)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype).to(device).requires_grad_(requires_grad)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 64), (1, 1), (0, 16), (3, 4100)])
def test_forward_matches_llama_rmsnorm(device, dtype, shape):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU only")
    x, w = sample_inputs(device, dtype, shape)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    tol = dict(rtol=1e-6, atol=1e-6) if dtype in (torch.float32, torch.float64) else dict(rtol=0, atol=0)
    if dtype in (torch.bfloat16, torch.float16):  # a sum of squares in another order may move rstd by an ulp
        tol = dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(y, reference(x, w, 1e-6), **tol)
    torch.testing.assert_close(torch.ops.lorart.rms_norm(x, w, 1e-6)[0], y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_backward_matches_llama_rmsnorm(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU only")
    x, w = sample_inputs(device, dtype, (9, 40), requires_grad=True)
    go = torch.randn(9, 40, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    dx, dw = torch.autograd.grad(rms_norm(x, w, 1e-5), (x, w), go)
    rx, rw = torch.autograd.grad(reference(x, w, 1e-5), (x, w), go)
    assert dx.dtype == dw.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(dx, rx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw, rw, rtol=1e-5, atol=1e-6)
    else:  # dw: ours sums the products in fp32, the plain path rounds each product to 16 bits first
        torch.testing.assert_close(dx.float(), rx.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dw.float(), rw.float(), rtol=1e-2, atol=2e-2)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    ox, ow = torch.autograd.grad(torch.ops.lorart.rms_norm(x2, w2, 1e-5)[0], (x2, w2), go)
    torch.testing.assert_close(ox, dx, rtol=0, atol=0)
    torch.testing.assert_close(ow, dw, rtol=0, atol=0)


def test_only_x_gradient_and_frozen_weight():
    x, w = sample_inputs(requires_grad=True)
    w.requires_grad_(False)
    rms_norm(x, w).sum().backward()
    xr = x.detach().requires_grad_()
    reference(xr, w, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    assert w.grad is None


def test_saves_x_and_rstd_only():
    x, w = sample_inputs(shape=(6, 32), requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        rms_norm(x, w)
    assert sorted(sizes) == [6, 32, 6 * 32]  # rstd, weight, x
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        reference(x, w, 1e-6)
    assert sum(s for s in sizes if s == 6 * 32) > 6 * 32  # the plain path keeps more: the check above can fail


def test_bad_input():
    x, w = sample_inputs()
    with pytest.raises(TypeError, match="`weight`"):
        rms_norm(x, w.double())
    with pytest.raises(ValueError, match="`weight`"):
        rms_norm(x, w[:3])
    with pytest.raises(ValueError, match="`eps`"):
        rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="`x`"):
        rms_norm(x[:, :0], w[:0])
    with pytest.raises(TypeError, match="`x`"):
        rms_norm(x.long(), w.long())


def test_model_norm_uses_fused_path_and_matches_plain():
    from lorart.models.llama import RMSNorm

    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 24, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        y = norm(x)
    assert sorted(sizes) == [6, 24, 6 * 24]
    torch.testing.assert_close(y, reference(x, norm.weight, 1e-5), rtol=1e-6, atol=1e-6)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 576), (5, 4096), (3, 16384), (2, 7)])
def test_cuda_matches_cpu(dtype, shape):
    x, w = sample_inputs("cpu", dtype, shape, requires_grad=True)
    go = torch.randn(*shape).to(dtype)
    y = rms_norm(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), go)
    xc, wc = x.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
    yc = rms_norm(xc, wc)
    dxc, dwc = torch.autograd.grad(yc, (xc, wc), go.cuda())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(yc.cpu(), y, **tol)
    torch.testing.assert_close(dxc.cpu(), dx, **tol)
    torch.testing.assert_close(dwc.cpu().float(), dw.float(), rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=1e-2)
