"""RMSNorm where eps matters: inputs small enough that eps is most of mean(x^2), against a float64 reference
written from the formula (rstd = 1 / sqrt(mean(x^2) + eps)); gradients in float64 at a tight tolerance, with a
gradient correlated with the output so that every term of the backward counts. (bench/mutants.py)"""
import pytest
import torch

from lorart.ops.norm import rms_norm


def reference64(x, w, eps):
    x64 = x.double()
    return w.double() * (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale, eps", [(1e-3, 1e-2), (1e-4, 1e-6), (3e-3, 1e-5)])
def test_eps_counts_once(device, dtype, scale, eps):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU only")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 80, generator=g) * scale).to(dtype).to(device)
    w = (torch.rand(80, generator=g) + 0.5).to(dtype).to(device)
    y = rms_norm(x, w, eps)
    ref = reference64(x.cpu(), w.cpu(), eps)
    if dtype == torch.bfloat16:  # n rounded to bf16, then w * n rounded: two bf16 roundings
        torch.testing.assert_close(y.cpu().double(), ref, rtol=2 * 2.0 ** -8, atol=0)
    else:
        torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-12 if dtype == torch.float64 else 4e-7, atol=0)
    # what eps added twice would give is far outside that tolerance (the test can tell)
    twice = reference64(x.cpu(), w.cpu(), 2 * eps)
    assert float(((twice - ref).abs() / ref.abs().clamp_min(1e-30)).max()) > 1e-3


def test_backward_float64_tight():
    g = torch.Generator().manual_seed(1)
    for scale, eps in ((1.0, 1e-6), (1e-3, 1e-4)):
        x = (torch.randn(5, 48, generator=g, dtype=torch.float64) * scale).requires_grad_()
        w = (torch.rand(48, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
        y = rms_norm(x, w, eps)
        # a gradient along the output: the projection term n * mean(g * n) is as large as g itself
        go = y.detach() * 3 + torch.randn(5, 48, generator=g, dtype=torch.float64) * 0.1
        dx, dw = torch.autograd.grad(y, (x, w), go)
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        rx, rw = torch.autograd.grad(reference64(xr, wr, eps), (xr, wr), go)
        torch.testing.assert_close(dx, rx, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(dw, rw, rtol=1e-11, atol=1e-13)
