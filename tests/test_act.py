"""torch.ops.lorart.swiglu against F.silu(gate) * up in fp64, gradients, opcheck, CPU vs CUDA, the Llama MLP."""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from lorart.ops.act import swiglu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one rounding of the fp32 result to the storage dtype, plus the fp32 math's few ulp
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7), torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


def sample_inputs(device="cpu", dtype=torch.float32, shape=(37, 130), requires_grad=False):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(*shape, generator=g) * 4).to(dtype).to(device).requires_grad_(requires_grad)
    up = torch.randn(*shape, generator=g).to(dtype).to(device).requires_grad_(requires_grad)
    return gate, up


def reference(gate, up):
    return F.silu(gate.double()) * up.double()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(37, 130), (5,), (2, 3, 64), (0, 8)])
def test_forward_matches_reference(device, dtype, shape):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU only")
    gate, up = sample_inputs(device, dtype, shape)
    out = swiglu(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    torch.testing.assert_close(out.double(), reference(gate, up), **TOL[dtype])
    torch.testing.assert_close(torch.ops.lorart.swiglu(gate, up), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_backward_matches_reference(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU only")
    gate, up = sample_inputs(device, dtype, requires_grad=True)
    go = torch.randn(gate.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    dg, du = torch.autograd.grad(swiglu(gate, up), (gate, up), go)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    rg, ru = torch.autograd.grad(reference(g64, u64), (g64, u64), go.double())
    assert dg.dtype == du.dtype == dtype
    torch.testing.assert_close(dg.double(), rg, **TOL[dtype])
    torch.testing.assert_close(du.double(), ru, **TOL[dtype])
    # the custom op's autograd gives the same
    gate2, up2 = gate.detach().requires_grad_(), up.detach().requires_grad_()
    dg2, du2 = torch.autograd.grad(torch.ops.lorart.swiglu(gate2, up2), (gate2, up2), go)
    torch.testing.assert_close(dg2, dg, rtol=0, atol=0)
    torch.testing.assert_close(du2, du, rtol=0, atol=0)


def test_special_values_and_exp_range():
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.0, -87.0, 89.0, -89.0, 100.0, -100.0,
                      float("inf"), float("nan")])
    out = swiglu(x, torch.ones_like(x))
    ref = F.silu(x)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-30, equal_nan=True)
    # the exp polynomial over the whole float range of arguments, through silu(g) with up = 1
    g = torch.linspace(-87, 88, 200_001)
    torch.testing.assert_close(swiglu(g, torch.ones_like(g)).double(), F.silu(g.double()), rtol=3e-7, atol=1e-37)


def test_saves_only_gate_and_up():
    gate, up = sample_inputs(requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(gate, up).sum().backward()
    assert len(saved) == 2
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (F.silu(gate) * up).sum().backward()
    assert len(saved) == 3  # the plain path keeps silu(gate) too: the check above can fail


def test_non_contiguous_inputs():
    gate, up = sample_inputs(shape=(16, 40))
    torch.testing.assert_close(swiglu(gate.t(), up.t()).double(), reference(gate.t(), up.t()), **TOL[torch.float32])


def test_bad_input():
    gate, up = sample_inputs()
    with pytest.raises(TypeError, match="`up`"):
        swiglu(gate, up.double())
    with pytest.raises(ValueError, match="`up`"):
        swiglu(gate, up[:3])
    with pytest.raises(TypeError, match="`gate`"):
        swiglu(gate.long(), up.long())


def test_llama_mlp_uses_fused_path_and_matches_plain():
    from lorart.models.config import LlamaConfig
    from lorart.models.llama import LlamaMLP

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=10, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    mlp = LlamaMLP(cfg)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = mlp(x)
    gx, = torch.autograd.grad(y.sum(), x)
    plain = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    px, = torch.autograd.grad(plain.sum(), x)
    torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, px, rtol=1e-5, atol=1e-6)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
        mlp(x)
    assert seen.count(3 * 5 * 40) == 3  # gate, up (swiglu) and the down input; the plain path keeps 4


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [8 * 1000, 1001])  # vector and scalar kernels
def test_cuda_matches_cpu(dtype, n):
    gate, up = sample_inputs("cpu", dtype, (n,), requires_grad=True)
    go = torch.randn(n).to(dtype)
    out = swiglu(gate, up)
    dg, du = torch.autograd.grad(out, (gate, up), go)
    gc, uc = gate.detach().cuda().requires_grad_(), up.detach().cuda().requires_grad_()
    outc = swiglu(gc, uc)
    dgc, duc = torch.autograd.grad(outc, (gc, uc), go.cuda())
    # the same formula; CUDA's fmaf contraction may differ in the last bit
    for a, b in ((out, outc), (dg, dgc), (du, duc)):
        torch.testing.assert_close(b.cpu().double(), a.double(), **TOL[dtype])
