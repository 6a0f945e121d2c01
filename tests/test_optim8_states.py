"""PagedAdamW(state_bits=8): state_dict formats and round trips (8->8, 32->8, 8->32, bitsandbytes'
AdamW8bit <-> lorart), min_8bit_size, the paging walk with 8-bit states, memory_report in real
bytes, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cuda
from lorart.ops.optim import dequantize_blockwise8, dynamic_map, quantize_blockwise8
from lorart.optim import PagedAdamW

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None
requires_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

WRAP = "__bnb_optimizer_quant_state__"
SHAPES = [(5000,), (7,), (70, 131), (300,)]  # (7,) and (300,) stay 32-bit under the default min_8bit_size


def _make(shapes=SHAPES, device="cpu"):
    return [torch.randn(s, device=device) for s in shapes]


def _run(pairs, steps, seed=1, skip=True):
    """The same gradients into every (optimizer, params); parameter i gets none when t % (i + 2) == 0."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = []
        for i, p in enumerate(pairs[0][1]):
            g = None if skip and t > 0 and t % (i + 2) == 0 else torch.randn(p.shape, generator=gen)
            grads.append(g)
        for opt, params in pairs:
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.device).clone()
            opt.step()


def _copy(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def _entry(sd, i):
    e = sd["state"][i]
    return {**{k: v for k, v in e.items() if k != WRAP}, **e.get(WRAP, {})}


def test_state_layout_and_min_8bit_size():
    ps = _copy(_make())
    opt = PagedAdamW(ps, lr=1e-3, state_bits=8)
    _run([(opt, ps)], 3)
    big, small = opt.state[ps[0]], opt.state[ps[1]]
    assert isinstance(big["step"], int) and big["step"] == 2  # no gradient at t = 2 for parameter 0
    assert big["state1"].dtype == torch.uint8 and big["state1"].shape == ps[0].shape
    assert big["absmax1"].shape == (math.ceil(5000 / 256),) and big["absmax2"].dtype == torch.float32
    assert torch.equal(big["qmap1"], dynamic_map(True)) and torch.equal(big["qmap2"], dynamic_map(False))
    assert set(small) == {"step", "state1", "state2"} and small["state1"].dtype == torch.float32
    sd = opt.state_dict()  # bitsandbytes' layout: quantisation tensors nested under its FSDP key
    assert set(sd["state"][0]) == {"step", WRAP} and set(sd["state"][0][WRAP]) == {
        "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}
    assert set(sd["state"][1][WRAP]) == {"state1", "state2"}
    everything = PagedAdamW(_copy(ps), state_bits=8, min_8bit_size=0)
    for p in everything.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    everything.step()
    assert all(everything.state[p]["state1"].dtype == torch.uint8 for p in everything.param_groups[0]["params"])


def test_memory_report_real_bytes():
    ps = _copy(_make())
    opt = PagedAdamW(ps, state_bits=8)
    _run([(opt, ps)], 1)
    r = opt.memory_report()
    want = sum(2 * p.numel() + 8 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel() for p in ps)
    assert r["host_state_bytes"] == want and r["resident_params"] == len(ps)


def test_8_to_8_round_trip_is_exact():
    ps = _make()
    a, b = _copy(ps), _copy(ps)
    first = PagedAdamW(a, lr=5e-3, weight_decay=0.02, state_bits=8)
    _run([(first, a)], 20, seed=3)
    sd = first.state_dict()
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    second = PagedAdamW(b, lr=5e-3, weight_decay=0.02, state_bits=8)
    second.load_state_dict(sd)
    _run([(first, a), (second, b)], 20, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for k, v in first.state[x].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(second.state[y][k])), k


def test_32_to_8_quantizes_and_8_to_32_dequantizes():
    ps = _make()
    a, b, c = _copy(ps), _copy(ps), _copy(ps)
    torch_opt = torch.optim.AdamW(a, lr=5e-3)
    _run([(torch_opt, a)], 10)
    eight = PagedAdamW(b, lr=5e-3, state_bits=8)
    eight.load_state_dict(torch_opt.state_dict())
    for x, y in zip(a, b):
        s32, s8 = torch_opt.state[x], eight.state[y]
        assert s8["step"] == int(s32["step"])
        if y.numel() >= 4096:
            q, am = quantize_blockwise8(s32["exp_avg"], True)
            assert torch.equal(s8["state1"], q) and torch.equal(s8["absmax1"], am)
            q, am = quantize_blockwise8(s32["exp_avg_sq"], False)
            assert torch.equal(s8["state2"], q) and torch.equal(s8["absmax2"], am)
        else:
            assert torch.equal(s8["state1"], s32["exp_avg"])
    thirty_two = PagedAdamW(c, lr=5e-3)
    thirty_two.load_state_dict(eight.state_dict())
    for y, z in zip(b, c):
        s8, s32 = eight.state[y], thirty_two.state[z]
        assert set(s32) == {"step", "exp_avg", "exp_avg_sq"} and float(s32["step"]) == s8["step"]
        if y.numel() >= 4096:
            assert torch.equal(s32["exp_avg"], dequantize_blockwise8(s8["state1"], s8["absmax1"], True))
            assert torch.equal(s32["exp_avg_sq"], dequantize_blockwise8(s8["state2"], s8["absmax2"], False))
        else:
            assert torch.equal(s32["exp_avg_sq"], s8["state2"])
    # and the 32-bit optimizer's dict is torch's again
    torch.optim.AdamW(_copy(ps)).load_state_dict(thirty_two.state_dict())


@requires_bnb
@pytest.mark.parametrize("direction", ["bnb_to_lorart", "lorart_to_bnb"])
def test_bitsandbytes_checkpoints_both_ways(direction):
    ps = _make()
    a, b, ref_params = _copy(ps), _copy(ps), _copy(ps)
    kw = dict(lr=5e-3, weight_decay=0.02)
    mk_first, mk_second = ((lambda x: bnb.optim.AdamW8bit(x, **kw)), (lambda x: PagedAdamW(x, state_bits=8, **kw)))
    if direction == "lorart_to_bnb":
        mk_first, mk_second = mk_second, mk_first
    first = mk_first(a)
    _run([(first, a)], 20, seed=3)
    sd = first.state_dict()
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    second = mk_second(b)
    second.load_state_dict(sd)
    for i, (x, y) in enumerate(zip(a, b)):  # bytes, absmax and step carried over exactly
        e1, e2 = first.state[x], second.state[y]
        assert int(e1["step"]) == int(e2["step"])
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in e1:
                assert torch.equal(e1[k], e2[k]), (i, k)
    _run([(first, a), (second, b)], 20, seed=4)  # both continue; the two implementations stay close
    move = torch.cat([(x.detach() - p).reshape(-1) for x, p in zip(a, ps)]).norm()
    diff = torch.cat([(x - y).detach().reshape(-1) for x, y in zip(a, b)])
    assert diff.abs().max() < 1.5 * kw["lr"] and diff.norm() / move < 0.03


@requires_bnb
def test_bitsandbytes_param_groups_load():
    """bitsandbytes' param_groups lack torch's keys (maximize, foreach, ...): the defaults fill them in."""
    ps = _make()
    a, b = _copy(ps), _copy(ps)
    first = bnb.optim.AdamW8bit([{"params": a[:2]}, {"params": a[2:], "lr": 1e-2}], lr=2e-3)
    _run([(first, a)], 5)
    second = PagedAdamW([{"params": b[:2]}, {"params": b[2:]}], state_bits=8)
    second.load_state_dict(first.state_dict())
    assert second.param_groups[1]["lr"] == 1e-2 and second.param_groups[0]["maximize"] is False
    _run([(second, b)], 2)


def test_load_rejects_mismatched_states():
    ps = _copy(_make())
    opt = PagedAdamW(ps, state_bits=8)
    _run([(opt, ps)], 2)
    sd = opt.state_dict()
    bad = {"state": {**sd["state"], 0: {"step": 1, WRAP: {**sd["state"][0][WRAP], "absmax1": torch.zeros(3)}}},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="absmax1 must be 20 float elements"):
        PagedAdamW(_copy(ps), state_bits=8).load_state_dict(bad)
    bad = {"state": {**sd["state"], 2: {"step": 1, "exp_avg": torch.zeros(5), "exp_avg_sq": torch.zeros(5)}},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="exp_avg has 5 elements, the parameter 9170"):
        PagedAdamW(_copy(ps), state_bits=8).load_state_dict(bad)
    bad = {"state": {**sd["state"], 1: {"step": 1, "momentum_buffer": torch.zeros(7)}},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="expected torch.optim.AdamW state"):
        PagedAdamW(_copy(ps), state_bits=8).load_state_dict(bad)


# ---- the paging walk with 8-bit states (CPU, synchronous copies) ------------------------------------
@pytest.mark.parametrize("budget, chunk_bytes", [(0, 4096), (0, 4100), (0, 1 << 20), (30_000, 4096)])
def test_paging_walk_8bit_cpu(budget, chunk_bytes):
    shapes = [(5000,), (4096,), (70, 131), (7,), (300,), (10_000,)]
    ps = _make(shapes)
    a, b = _copy(ps), _copy(ps)
    groups = lambda x: [{"params": x[:3]}, {"params": x[3:], "lr": 1e-2, "weight_decay": 0.1}]  # noqa: E731
    res = PagedAdamW(groups(a), lr=3e-3, state_bits=8)
    pag = PagedAdamW(groups(b), lr=3e-3, state_bits=8, gpu_budget_bytes=budget, page_chunk_bytes=chunk_bytes)
    pag._page_cpu = True
    _run([(res, a), (pag, b)], 12)
    r = pag.memory_report()
    assert r["paged_params"] == (6 if budget == 0 else r["paged_params"]) and r["paged_params"] >= 1
    assert r["paged_h2d_bytes_per_step"] > 0
    for x, y in zip(a, b):  # the same kernel on the same bytes: bitwise equal
        assert torch.equal(x, y)
        for k, v in res.state[x].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(pag.state[y][k])), k
    sd = pag.state_dict()
    c = _copy(b)
    again = PagedAdamW(groups(c), state_bits=8)
    again.load_state_dict(sd)
    for x, z in zip(a, c):
        assert torch.equal(again.state[z]["state2"], res.state[x]["state2"])


def test_paged_memory_report_counts_8bit_bytes():
    ps = _copy(_make([(5000,), (300,)]))
    opt = PagedAdamW(ps, state_bits=8, gpu_budget_bytes=0, page_chunk_bytes=4096)
    opt._page_cpu = True
    _run([(opt, ps)], 1, skip=False)
    r = opt.memory_report()
    # 8-bit pool: 5000 rounded up to 5120 (20 blocks): 2 x 5120 B + 2 x 20 x 4 B; 32-bit pool: 2 x 300 x 4 B
    assert r["host_state_bytes"] == 2 * 5120 + 2 * 20 * 4 + 2 * 300 * 4
    assert r["paged_params"] == 2 and r["paged_h2d_bytes_per_step"] == r["host_state_bytes"]


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("budget", [0, 40_000])
def test_paged_equals_resident_8bit_cuda(budget):
    shapes = [(5000,), (17, 329), (5,), (8192,), (999,)]
    ps = _make(shapes, "cuda")
    a, b = _copy(ps), _copy(ps)
    res = PagedAdamW(a, lr=1e-2, weight_decay=0.1, state_bits=8, gpu_budget_bytes=1 << 40)
    pag = PagedAdamW(b, lr=1e-2, weight_decay=0.1, state_bits=8, gpu_budget_bytes=budget, page_chunk_bytes=4096)
    _run([(res, a), (pag, b)], 30)
    torch.cuda.synchronize()
    r = pag.memory_report()
    assert r["paged_params"] >= 1 and r["paged_h2d_bytes_per_step"] > 0
    sd = pag.state_dict()  # synchronises the pager
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y)
        e = _entry(sd, i)
        assert torch.equal(res.state[x]["state1"].cpu(), e["state1"].cpu())
    assert pag.state[b[0]]["state1"].device.type == "cpu" and pag.state[b[0]]["state1"].is_pinned()


@requires_cuda
@pytest.mark.cuda
def test_8bit_cuda_matches_cpu_optimizer():
    ps = _make()
    a, b = _copy(ps), [p.detach().cuda().requires_grad_() for p in ps]
    oc, og = PagedAdamW(a, lr=1e-3, state_bits=8), PagedAdamW(b, lr=1e-3, state_bits=8)
    _run([(oc, a), (og, b)], 20)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach().cpu(), x.detach(), rtol=1e-4, atol=1e-4)
