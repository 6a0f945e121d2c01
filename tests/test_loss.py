"""lorart.ops.loss.linear_cross_entropy against F.cross_entropy on the full logits (the plain path)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from lorart.ops.loss import default_chunk_rows, linear_cross_entropy


def _inputs(N=37, H=16, V=50, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return h, W, b, y


def _reference(h, W, b, y, reduction):
    return F.cross_entropy(F.linear(h, W, b).float() if h.dtype != torch.float64 else F.linear(h, W, b), y,
                           ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_cross_entropy_fp32(reduction, chunk, bias):
    h, W, b, y = _inputs(bias=bias)
    params = [t for t in (h, W, b) if t is not None]
    ours = linear_cross_entropy(h, W, y, b, reduction=reduction, chunk_rows=chunk)
    g_ours = torch.autograd.grad(ours * 1.7, params)
    ref = _reference(h, W, b, y, reduction)
    g_ref = torch.autograd.grad(ref * 1.7, params)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for a, c in zip(g_ours, g_ref):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_cross_entropy_16bit(dtype):
    h, W, b, y = _inputs(N=64, H=32, V=300, dtype=dtype)
    ours = linear_cross_entropy(h, W, y, b, reduction="mean", chunk_rows=16)
    g_ours = torch.autograd.grad(ours, (h, W, b))
    ref = _reference(h, W, b, y, "mean")
    g_ref = torch.autograd.grad(ref, (h, W, b))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # the same 16-bit logits, widened once
    for a, c in zip(g_ours, g_ref):
        assert a.dtype == dtype
        # 16-bit gradient rounding; dW sums chunk products in fp32 where the plain path runs one GEMM
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-3)


def test_gradcheck_fp64():
    h, W, b, y = _inputs(N=9, H=5, V=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, W, b: linear_cross_entropy(h, W, y, b, reduction="mean", chunk_rows=4),
                                    (h, W, b))


def test_only_needed_gradients_and_frozen_weight():
    h, W, b, y = _inputs()
    W.requires_grad_(False)
    b.requires_grad_(False)
    loss = linear_cross_entropy(h, W, y, b)
    loss.backward()
    ref_h = h.detach().clone().requires_grad_()
    _reference(ref_h, W, b, y, "sum").backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    assert W.grad is None and b.grad is None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, W, y, b), _reference(h, W, b, y, "sum"))


def test_all_ignored_and_empty():
    h, W, b, y = _inputs(N=6)
    y[:] = -100
    loss = linear_cross_entropy(h, W, y, b, reduction="mean")
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0
    empty = linear_cross_entropy(torch.zeros(0, 16), torch.randn(50, 16), torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_forms_all_logits():
    N, H, V, chunk = 256, 8, 500, 32
    h, W, b, y = _inputs(N=N, H=H, V=V)
    with _LargestOutput() as mode:
        loss = linear_cross_entropy(h, W, y, b, chunk_rows=chunk)
        loss.backward()
    assert mode.largest <= chunk * V  # the plain path's largest tensor is N * V = 128000
    with _LargestOutput() as mode:
        _reference(h, W, b, y, "sum").backward()
    assert mode.largest >= N * V  # the check above can fail


def test_default_chunk_rows():
    assert default_chunk_rows(49152) * 49152 * 4 <= 64 << 20
    assert default_chunk_rows(10**9) == 16


@pytest.mark.parametrize("kw,match", [
    (dict(reduction="max"), "reduction"),
    (dict(chunk_rows=0), "chunk_rows"),
])
def test_bad_arguments(kw, match):
    h, W, b, y = _inputs()
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, W, y, b, **kw)


def test_bad_shapes_and_labels():
    h, W, b, y = _inputs()
    with pytest.raises(ValueError, match="`weight`"):
        linear_cross_entropy(h, W[:, :3], y)
    with pytest.raises(ValueError, match="`labels`"):
        linear_cross_entropy(h, W, y[:5])
    with pytest.raises(ValueError, match="`labels`"):
        linear_cross_entropy(h, W, y.float())
    with pytest.raises(ValueError, match=r"ids in \[0, 50\)"):
        linear_cross_entropy(h, W, torch.full_like(y, 50))
    with pytest.raises(ValueError, match=r"got -3"):
        linear_cross_entropy(h, W, torch.full_like(y, -3))
    with pytest.raises(TypeError, match="`weight`"):
        linear_cross_entropy(h, W.double(), y)
    with pytest.raises(ValueError, match="`bias`"):
        linear_cross_entropy(h, W, y, b[:3])


def test_model_chunked_loss_equals_logits_loss():
    from lorart.models.config import LlamaConfig
    from lorart.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :3] = -100
    for red in ("mean", "sum"):
        model.zero_grad()
        a = model(input_ids=ids, attention_mask=mask, labels=labels, loss_reduction=red, return_logits=False)
        assert a.logits is None
        a.loss.backward()
        ga = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        b = model(input_ids=ids, attention_mask=mask, labels=labels, loss_reduction=red)
        assert b.logits is not None
        b.loss.backward()
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(ga[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@requires_cuda
@pytest.mark.cuda
def test_cuda_autocast_matches_plain_path():
    h, W, b, y = _inputs(N=300, H=64, V=1000)
    h, W, b, y = (t.detach().cuda().requires_grad_(t.requires_grad) if t.is_floating_point() else t.cuda()
                  for t in (h, W, b, y))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, W, y, b, reduction="mean", chunk_rows=64)
        g_ours = torch.autograd.grad(ours, (h, W, b))
        ref = F.cross_entropy(F.linear(h, W, b).float(), y, reduction="mean")
        g_ref = torch.autograd.grad(ref, (h, W, b))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, c in zip(g_ours, g_ref):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-3)


def test_cpu_autocast_matches_plain_path():
    h, W, b, y = _inputs(N=40, H=16, V=60)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, W, y, b, reduction="mean", chunk_rows=16)
        g_ours = torch.autograd.grad(ours, (h, W, b))
        ref = F.cross_entropy(F.linear(h, W, b).float(), y, reduction="mean")
        g_ref = torch.autograd.grad(ref, (h, W, b))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # the same bf16 logits, widened once
    for a, c in zip(g_ours, g_ref):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-3)
