"""PagedAdamW and lorart::adamw_step_ against torch.optim.AdamW (the reference) and a
pure-PyTorch AdamW written from the formula (for 16-bit parameters with fp32 states)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cuda
from lorart.optim import PagedAdamW

SHAPES = [(7,), (33, 65), (4, 3, 5), (1030,)]


def _make(shapes, device, dtype=torch.float32):
    return [torch.randn(s, device=device, dtype=dtype) for s in shapes]


def _run_pair(opt_a, params_a, opt_b, params_b, steps, device, skip=True, seed=1):
    """Same gradients into both; parameter i gets no gradient at steps where (t % (i + 2)) == 0."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, (a, b) in enumerate(zip(params_a, params_b)):
            if skip and t % (i + 2) == 0 and t > 0:
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, generator=gen).to(device=device, dtype=a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()


def _max_diff(xs, ys):
    return max((x.float() - y.float().to(x.device)).abs().max().item() for x, y in zip(xs, ys))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw(device, weight_decay):
    ps = _make(SHAPES, device)
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    ref = torch.optim.AdamW(a, lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay)
    opt = PagedAdamW(b, lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay)
    _run_pair(ref, a, opt, b, 100, device)
    d = _max_diff(a, b)
    print(f"max |param diff| vs torch.optim.AdamW after 100 steps ({device}, wd={weight_decay}): {d:.3g}")
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
        sx, sy = ref.state[x], opt.state[y]
        assert float(sx["step"]) == float(sy["step"])
        torch.testing.assert_close(sy["exp_avg"].to(device), sx["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sy["exp_avg_sq"].to(device), sx["exp_avg_sq"], rtol=1e-5, atol=1e-7)
    assert not torch.equal(torch.stack([p.sum() for p in ps]), torch.stack([p.sum() for p in b]).detach())


def test_param_groups_and_maximize(device):
    ps = _make(SHAPES, device)
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    groups = lambda x: [{"params": x[:2], "lr": 1e-2, "weight_decay": 0.0},  # noqa: E731
                        {"params": x[2:], "betas": (0.8, 0.95), "maximize": True}]
    ref = torch.optim.AdamW(groups(a), lr=2e-3, weight_decay=0.05)
    opt = PagedAdamW(groups(b), lr=2e-3, weight_decay=0.05)
    _run_pair(ref, a, opt, b, 30, device)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert set(opt.param_groups[0].keys()) == set(ref.param_groups[0].keys())


@pytest.mark.parametrize("direction", ["torch_to_lorart", "lorart_to_torch"])
def test_state_dict_round_trip(device, direction):
    ps = _make(SHAPES, device)
    mk = lambda: [p.clone().requires_grad_() for p in ps]  # noqa: E731
    a, b = mk(), mk()
    kw = dict(lr=5e-3, weight_decay=0.02)
    first = (torch.optim.AdamW if direction == "torch_to_lorart" else PagedAdamW)(a, **kw)
    # a continuous run as the reference
    ref_params = mk()
    ref = torch.optim.AdamW(ref_params, **kw)
    _run_pair(first, a, ref, ref_params, 20, device, seed=3)
    sd = first.state_dict()
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    second = (PagedAdamW if direction == "torch_to_lorart" else torch.optim.AdamW)(b, **kw)
    second.load_state_dict(sd)
    assert set(second.state_dict()["state"][0].keys()) == {"step", "exp_avg", "exp_avg_sq"}
    _run_pair(second, b, ref, ref_params, 20, device, seed=4)
    for x, y in zip(b, ref_params):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_fp32_states(device, dtype):
    """Reference from the formula: states and math in fp32, the parameter rounded to `dtype` each step."""
    ps = _make(SHAPES[:2], device, dtype)
    b = [p.clone().requires_grad_() for p in ps]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
    opt = PagedAdamW(b, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = [p.clone() for p in ps]
    m = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
    v = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
    for t in range(1, 11):
        for i in range(len(ps)):
            g = torch.randn(ps[i].shape, device=device).to(dtype)
            b[i].grad = g.clone()
            p32, g32 = ref[i].float(), g.float()
            p32.mul_(1 - lr * wd)
            m[i].lerp_(g32, 1 - b1)
            v[i].mul_(b2).addcmul_(g32, g32, value=1 - b2)
            denom = (v[i].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            p32.addcdiv_(m[i], denom, value=-lr / (1 - b1**t))
            ref[i] = p32.to(dtype)
        opt.step()
    for i in range(len(ps)):
        assert opt.state[b[i]]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(opt.state[b[i]]["exp_avg"].to(device), m[i], rtol=1e-5, atol=1e-6)
        # one 16-bit rounding step apart at most
        torch.testing.assert_close(b[i].detach(), ref[i], rtol=0, atol=float(ref[i].float().abs().max()) * 2**-7)


def test_nan_gradient_propagates_like_torch(device):
    """Documented policy: no check, no skip; NaN in a gradient poisons that parameter only, as in torch."""
    ps = _make([(5,), (6,)], device)
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    ref, opt = torch.optim.AdamW(a, lr=1e-2), PagedAdamW(b, lr=1e-2)
    for x, y in zip(a, b):
        g = torch.randn(x.shape, device=device)
        x.grad, y.grad = g.clone(), g.clone()
    a[0].grad[2] = b[0].grad[2] = float("nan")
    ref.step()
    opt.step()
    assert torch.isnan(b[0][2]) and torch.isnan(opt.state[b[0]]["exp_avg_sq"][2])
    assert torch.isfinite(b[1]).all() and torch.isfinite(b[0][[0, 1, 3, 4]]).all()
    torch.testing.assert_close(b[0], a[0], equal_nan=True)
    torch.testing.assert_close(b[1], a[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "`lr`"),
    (dict(betas=(1.0, 0.999)), "`beta1`"),
    (dict(betas=(0.9, -0.1)), "`beta2`"),
    (dict(betas=(0.9,)), "`betas`"),
    (dict(eps=-1e-8), "`eps`"),
    (dict(weight_decay=-0.1), "`weight_decay`"),
    (dict(amsgrad=True), "amsgrad"),
    (dict(state_bits=16), "`state_bits`"),
    (dict(state_bits=True), "`state_bits`"),
    (dict(min_8bit_size=-1), "`min_8bit_size`"),
    (dict(gpu_budget_bytes=-1), "`gpu_budget_bytes`"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_bad_parameters():
    with pytest.raises(ValueError, match="meta"):
        PagedAdamW([torch.zeros(3, device="meta", requires_grad=True)])
    with pytest.raises(TypeError, match="float32"):
        PagedAdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    p = torch.zeros(4, 4, requires_grad=True)
    opt = PagedAdamW([p])
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # newer torch refuses a gradient of another dtype unless told
    p.grad = torch.zeros(4, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        opt.step()


def test_memory_report_cpu():
    ps = [torch.zeros(10, requires_grad=True), torch.zeros(3, 4, requires_grad=True)]
    opt = PagedAdamW(ps)
    assert opt.memory_report()["host_state_bytes"] == 0  # lazily laid out
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    r = opt.memory_report()
    assert r["host_state_bytes"] == 2 * 4 * 22 and r["gpu_state_bytes"] == 0 and r["resident_params"] == 2


# ---- CUDA: resident vs paged --------------------------------------------------------
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("budget", [0, 40_000])  # everything paged; some resident, the rest paged
def test_paged_equals_resident_cuda(budget):
    shapes = [(3000,), (17, 129), (5,), (2048,), (999,)]
    ps = _make(shapes, "cuda")
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    res = PagedAdamW(a, lr=1e-2, weight_decay=0.1, gpu_budget_bytes=1 << 40)
    pag = PagedAdamW(b, lr=1e-2, weight_decay=0.1, gpu_budget_bytes=budget, page_chunk_bytes=4096)
    _run_pair(res, a, pag, b, 40, "cuda")
    torch.cuda.synchronize()
    r = pag.memory_report()
    assert r["paged_params"] >= (len(shapes) if budget == 0 else 1) and r["paged_h2d_bytes_per_step"] > 0
    assert res.memory_report()["paged_params"] == 0
    sd = pag.state_dict()  # synchronises the pager
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y)  # same kernel, same math: bitwise equal
        assert torch.equal(res.state[x]["exp_avg_sq"].cpu(), sd["state"][i]["exp_avg_sq"].cpu())
    assert pag.state[b[0]]["exp_avg"].device.type == "cpu" and pag.state[b[0]]["exp_avg"].is_pinned()


@requires_cuda
@pytest.mark.cuda
def test_paged_matches_torch_and_round_trips_cuda():
    ps = _make([(3000,), (17, 129)], "cuda")
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    ref = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1)
    pag = PagedAdamW(b, lr=1e-2, weight_decay=0.1, gpu_budget_bytes=0, page_chunk_bytes=4096)
    _run_pair(ref, a, pag, b, 50, "cuda")
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    sd = pag.state_dict()
    ref2 = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    ref2.load_state_dict(sd)
    assert ref2.state[b[0]]["exp_avg"].is_cuda
    pag.load_state_dict(ref.state_dict())
    assert pag.state[b[0]]["exp_avg"].device.type == "cpu"


# ---- the paging walk (chunks, segments split across chunks, groups) on the CPU -------
@pytest.mark.parametrize("budget", [0, 40_000])
def test_paging_walk_cpu(budget):
    """The chunk walk of the pager with synchronous copies: bitwise equal to the resident path."""
    shapes = [(3000,), (17, 129), (5,), (2048,), (999,)]
    ps = _make(shapes, "cpu")
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    groups = [{"params": b[:3]}, {"params": b[3:], "lr": 1e-2, "weight_decay": 0.1}]
    res = PagedAdamW([{"params": a[:3]}, {"params": a[3:], "lr": 1e-2, "weight_decay": 0.1}], lr=3e-3)
    pag = PagedAdamW(groups, lr=3e-3, gpu_budget_bytes=budget, page_chunk_bytes=4096)
    pag._page_cpu = True
    _run_pair(res, a, pag, b, 12, "cpu")
    r = pag.memory_report()
    assert r["paged_params"] == (5 if budget == 0 else 3)  # 40 KB: 16 KB staging, (17, 129) and (5,) resident and r["paged_h2d_bytes_per_step"] > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert torch.equal(res.state[x]["exp_avg_sq"], pag.state[y]["exp_avg_sq"])
    sd = pag.state_dict()
    c = [p.detach().clone().requires_grad_() for p in b]
    ref = torch.optim.AdamW([{"params": c[:3]}, {"params": c[3:]}])
    ref.load_state_dict(sd)
    for x, z in zip(a, c):
        assert torch.equal(ref.state[z]["exp_avg"], res.state[x]["exp_avg"])


def test_frozen_params_get_no_state_until_they_have_grads():
    w = torch.randn(50, requires_grad=False)
    x = torch.randn(10, requires_grad=True)
    opt = PagedAdamW([x, w], lr=1e-2)
    x.grad = torch.randn(10)
    opt.step()
    assert opt.memory_report()["host_state_bytes"] == 8 * 10
    m_before = opt.state[x]["exp_avg"].clone()
    w.requires_grad_(True)
    w.grad = torch.randn(50)
    x.grad = None
    opt.step()  # a new layout, x's state carried over
    assert opt.memory_report()["host_state_bytes"] == 8 * 60
    assert torch.equal(opt.state[x]["exp_avg"], m_before) and float(opt.state[x]["step"]) == 1.0
    assert float(opt.state[w]["step"]) == 1.0


def test_training_loop_with_closure_and_zero_grad(device):
    torch.manual_seed(1)
    net_a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    net_b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    net_b.load_state_dict(net_a.state_dict())
    x, y = torch.randn(32, 8, device=device), torch.randn(32, 1, device=device)
    ref = torch.optim.AdamW(net_a.parameters(), lr=1e-2)
    opt = PagedAdamW(net_b.parameters(), lr=1e-2)
    for _ in range(20):
        for net, o in ((net_a, ref), (net_b, opt)):
            def closure(net=net, o=o):
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(net(x), y)
                loss.backward()
                return loss
            loss = o.step(closure)
            assert loss is not None
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)


def test_step_bumps_version_counters_like_torch():
    """A parameter saved for a backward and then stepped makes that backward fail, as with torch's optimizers."""
    x = torch.randn(6, requires_grad=True)
    opt = PagedAdamW([x], lr=1e-2)
    loss = (x * x).sum()  # saves x
    x.grad = torch.ones(6)
    v0 = x._version
    opt.step()
    assert x._version > v0
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("chunk_bytes", [4096, 4100, 12288])
def test_paging_walk_cpu_odd_sizes(chunk_bytes):
    """Sizes around the alignment (4) and chunk (multiple of 64) boundaries, some parameters without grads."""
    shapes = [(1,), (63,), (64,), (65,), (1023,), (1025,), (3, 7), (2049,)]
    ps = _make(shapes, "cpu")
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    res = PagedAdamW(a, lr=1e-2, weight_decay=0.05)
    pag = PagedAdamW(b, lr=1e-2, weight_decay=0.05, gpu_budget_bytes=0, page_chunk_bytes=chunk_bytes)
    pag._page_cpu = True
    _run_pair(res, a, pag, b, 9, "cpu")
    assert pag.memory_report()["paged_params"] == len(shapes)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert torch.equal(res.state[x]["exp_avg"], pag.state[y]["exp_avg"])
