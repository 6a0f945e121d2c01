"""8-bit blockwise AdamW states: the dynamic maps against bitsandbytes', torch.ops.lorart.adamw8_step_
against a pure-PyTorch reference of the algorithm (written here from the spec in docs/optim.md),
PagedAdamW(state_bits=8) against bitsandbytes' AdamW8bit and against our own 32-bit AdamW, opcheck,
bad input. The optimizer-level features (state_dict, paging) are in test_optim8_states.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from lorart.ops._common import _C
from lorart.ops.optim import adamw8_step_, dequantize_blockwise8, dynamic_map, quantize_blockwise8
from lorart.optim import PagedAdamW

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001
    bnb = None
requires_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

B = 256
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


# ---- the reference, from the spec ------------------------------------------------------------
def ref_dequantize(q, absmax, code):
    n = q.numel()
    return code[q.reshape(-1).long()] * absmax.repeat_interleave(B)[:n]


def ref_quantize(x, code):
    """absmax = max |x| per 256 (NaN propagates); q = number of decision points (code[i] + code[i+1]) / 2
    below x / absmax, i.e. the nearest code with ties to the lower one; NaN -> 0."""
    n = x.numel()
    nb = -(-n // B)
    xb = F.pad(x.reshape(-1), (0, nb * B - n)).view(nb, B)
    absmax = xb.abs().amax(1)
    normed = (xb / absmax[:, None]).reshape(-1)[:n]
    mids = 0.5 * (code[:-1] + code[1:])
    q = torch.searchsorted(mids, normed, side="left")
    q[torch.isnan(normed)] = 0
    return q.to(torch.uint8), absmax


def ref_step(p, g, q1, q2, a1, a2, step, lr, beta1, beta2, eps, weight_decay, maximize=False):
    """One step in place: dequantise, torch.optim.AdamW's arithmetic in fp32 (the parameter takes the fp32
    states), requantise."""
    c1, c2 = dynamic_map(True).to(p.device), dynamic_map(False).to(p.device)
    m, v = ref_dequantize(q1, a1, c1), ref_dequantize(q2, a2, c2)
    p32, g32 = p.float().reshape(-1), g.float().reshape(-1)
    if maximize:
        g32 = -g32
    p32.mul_(1 - lr * weight_decay)
    m.lerp_(g32, 1 - beta1)
    v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p32.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    p.copy_(p32.view(p.shape))
    for q, a, x, c in ((q1, a1, m, c1), (q2, a2, v, c2)):
        qn, an = ref_quantize(x, c)
        q.copy_(qn.view(q.shape))
        a.copy_(an)


def assert_bytes_close(got, want, frac=1e-3):
    """Bytes equal except a small fraction one code apart (fp32 rounding differences that cross a decision
    point between two codes)."""
    d = (got.int() - want.int()).abs()
    if d.numel() == 0:
        return
    assert d.max() <= 1, f"bytes differ by up to {int(d.max())} codes"
    assert (d > 0).float().mean() <= frac, f"{(d > 0).float().mean().item():.2e} of the bytes differ"


def _states(shapes, device, random=True):
    out = []
    for s in shapes:
        n = math.prod(s)
        nb = -(-n // B)
        if random:
            out.append((torch.randint(0, 256, s, dtype=torch.uint8, device=device),
                        torch.randint(0, 256, s, dtype=torch.uint8, device=device),
                        torch.rand(nb, device=device) * 0.1, torch.rand(nb, device=device) * 0.01))
        else:
            out.append((torch.zeros(s, dtype=torch.uint8, device=device), torch.zeros(s, dtype=torch.uint8, device=device),
                        torch.zeros(nb, device=device), torch.zeros(nb, device=device)))
    return out


def sample_inputs(device, dtype=torch.float32):
    shapes = [(3,), (256,), (300, 7), (0,), (4097,)]
    out = []
    for steps, random in (([1] * len(shapes), False), ([1, 5, 2, 7, 3], True)):
        ps = [torch.randn(s, device=device).to(dtype) for s in shapes]
        gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        st = _states(shapes, device, random)
        out.append(((ps, gs, [x[0] for x in st], [x[1] for x in st], [x[2] for x in st], [x[3] for x in st], steps),
                    dict(HP)))
    return out


# ---- the maps ---------------------------------------------------------------------------------
@requires_bnb
@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes(signed):
    assert torch.equal(dynamic_map(signed), bnbF.create_dynamic_map(signed=signed))


def test_maps_structure():
    """Independent of bitsandbytes: sorted, 0 and 1 where the construction puts them, 7 decades."""
    s, u = dynamic_map(True), dynamic_map(False)
    for c in (s, u):
        assert c.shape == (256,) and (c[1:] > c[:-1]).all() and c[-1] == 1.0
    assert s[127] == 0 and u[0] == 0 and (s[:127] < 0).all()
    torch.testing.assert_close(s[:127], -s[128:255].flip(0))  # negatives mirror the positives
    for c, per_decade in ((s[128:255], [1, 2, 4, 8, 16, 32, 64]), (u[1:255], [2, 4, 8, 16, 32, 64, 128])):
        counts = [int(((c >= 10.0**(i - 7)) & (c < 10.0**(i - 6))).sum()) for i in range(7)]
        assert counts == per_decade


def test_quantize_blockwise8_matches_reference():
    x = torch.randn(3 * B + 17) * torch.logspace(-8, 0, 3 * B + 17)  # every decade of the map is used
    x[5] = 0.0
    x[B:2 * B] = 0.0  # an all-zero block: absmax 0, bytes 0 (as bitsandbytes)
    for signed in (True, False):
        xs = x if signed else x.abs()
        q, a = quantize_blockwise8(xs, signed)
        rq, ra = ref_quantize(xs, dynamic_map(signed))
        assert torch.equal(q, rq) and torch.equal(a, ra)
        assert (q[B:2 * B] == 0).all() and a[1] == 0
        back = dequantize_blockwise8(q, a, signed)
        assert torch.equal(back, ref_dequantize(q, a, dynamic_map(signed)))
        # the nearest code: the error is at most half the gap around it
        code = dynamic_map(signed)
        gap = torch.maximum(code[q.long().clamp(max=254) + 1] - code[q.long()],
                            code[q.long()] - code[q.long().clamp(min=1) - 1])
        assert ((back - xs).abs() <= (0.5 * gap + 1e-6) * a.repeat_interleave(B)[:xs.numel()]).all()


# ---- the op -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_matches_reference(device, dtype):
    for args, kw in sample_inputs(device, dtype):
        ps, gs, q1, q2, a1, a2, steps = args
        ref = [[t.clone() for t in lst] for lst in (ps, gs, q1, q2, a1, a2)]
        adamw8_step_(ps, gs, q1, q2, a1, a2, steps, **kw)
        for i in range(len(ps)):
            ref_step(*(r[i] for r in ref), steps[i], kw["lr"], kw["beta1"], kw["beta2"], kw["eps"],
                     kw["weight_decay"])
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=2**-7)
            torch.testing.assert_close(ps[i].float(), ref[0][i].float(), **tol)
            assert_bytes_close(q1[i], ref[2][i])
            assert_bytes_close(q2[i], ref[3][i])
            torch.testing.assert_close(a1[i], ref[4][i], rtol=1e-5, atol=0)
            torch.testing.assert_close(a2[i], ref[5][i], rtol=1e-5, atol=0)


def test_op_many_steps_matches_reference_with_missing_grads_and_maximize():
    shapes = [(1000,), (33, 65), (B,)]
    ps = [torch.randn(s) for s in shapes]
    st = _states(shapes, "cpu", random=False)
    ref_p = [p.clone() for p in ps]
    ref_st = [[t.clone() for t in s] for s in st]
    steps = [0] * len(shapes)
    for t in range(30):
        for i in range(len(shapes)):
            if t % (i + 2) == 1:
                continue  # no gradient this step
            g = torch.randn(shapes[i])
            steps[i] += 1
            kw = dict(HP, maximize=(i == 1))
            adamw8_step_([ps[i]], [g], *([x] for x in st[i]), [steps[i]], **kw)
            ref_step(ref_p[i], g, *ref_st[i], steps[i], HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                     HP["weight_decay"], maximize=(i == 1))
    for i in range(len(shapes)):
        torch.testing.assert_close(ps[i], ref_p[i], rtol=1e-4, atol=1e-4)
        assert_bytes_close(st[i][0], ref_st[i][0], frac=5e-3)
        assert_bytes_close(st[i][1], ref_st[i][1], frac=5e-3)


def test_opcheck(device):
    for args, kw in sample_inputs(device):
        torch.library.opcheck(torch.ops.lorart.adamw8_step_.default, args, kw)


def test_nan_poisons_only_its_block():
    p, g = torch.randn(3 * B), torch.randn(3 * B)
    g[B + 7] = float("nan")
    q1, q2, a1, a2 = _states([(3 * B,)], "cpu", random=False)[0]
    adamw8_step_([p], [g], [q1], [q2], [a1], [a2], [1], **HP)
    assert torch.isnan(a1[1]) and torch.isnan(a2[1]) and torch.isfinite(a1[[0, 2]]).all()
    assert torch.isnan(p[B + 7]) and torch.isfinite(p[:B + 7]).all() and torch.isfinite(p[B + 8:]).all()
    g[B + 7] = 0.0
    adamw8_step_([p], [g], [q1], [q2], [a1], [a2], [2], **HP)  # the poisoned block's states are NaN now
    assert torch.isnan(p[B:2 * B]).all() and torch.isfinite(p[:B]).all() and torch.isfinite(p[2 * B:]).all()


def _one(n=300, dtype=torch.float32):
    return [torch.zeros(n, dtype=dtype)]


def _q(n=300):
    return [torch.zeros(n, dtype=torch.uint8)]


def _a(n=2):
    return [torch.zeros(n)]


@pytest.mark.parametrize("args, exc, match", [
    (lambda: (_one() * 2, _one(), _q(), _q(), _a(), _a(), [1]), ValueError, "one length"),
    (lambda: (_one(), _one(), _one(), _q(), _a(), _a(), [1]), TypeError, r"q_exp_avgs\[0\]`: expected dtype uint8"),
    (lambda: (_one(), _one(), _q(), _q(301), _a(), _a(), [1]), ValueError, r"q_exp_avg_sqs\[0\]`: expected 300"),
    (lambda: (_one(), _one(), _q(), _q(), _a(1), _a(), [1]), ValueError,
     r"absmax_exp_avgs\[0\]`: expected 2 elements \(ceil\(params\[0\].numel / 256\)\)"),
    (lambda: (_one(), _one(), _q(), _q(), _a(), [torch.zeros(2, dtype=torch.float16)], [1]), TypeError,
     r"absmax_exp_avg_sqs\[0\]`: expected dtype float32"),
    (lambda: (_one(), _one(dtype=torch.bfloat16), _q(), _q(), _a(), _a(), [1]), TypeError, r"grads\[0\]"),
    (lambda: ([torch.zeros(20, 15).t()], [torch.zeros(15, 20)], _q(), _q(), _a(), _a(), [1]), ValueError,
     "contiguous"),
    (lambda: (_one(), _one(), _q(), _q(), _a(), _a(), [0]), ValueError, r"steps\[0\]"),
])
def test_op_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        adamw8_step_(*args(), **HP)


def test_c_level_checks():
    """The C++ API checks on its own (for callers that bypass the Python layer)."""
    p, q, a = torch.zeros(300), torch.zeros(300, dtype=torch.uint8), torch.zeros(2)
    with pytest.raises(ValueError, match=r"absmax_exp_avg_sqs\[0\]`: expected 2 elements"):
        _C.adamw8_step([p], [p], [q], [q], [a], [torch.zeros(3)], [1], 1e-3,
                       0.9, 0.999, 1e-8, 0.0, False, 0)
    with pytest.raises(TypeError, match=r"q_exp_avgs\[0\]`: expected dtype uint8"):
        _C.adamw8_step([p], [p], [p], [q], [a], [a], [1], 1e-3, 0.9, 0.999,
                       1e-8, 0.0, False, 0)
    with pytest.raises(ValueError, match="`absmax`: expected 2 elements"):
        _C.quantize_blockwise8(p, True, q, torch.zeros(1))
    # meta tensors take the fake implementation (shape checks only), as torch.compile traces the op
    meta = lambda n, dt=torch.float32: [torch.zeros(n, dtype=dt, device="meta")]  # noqa: E731
    adamw8_step_(meta(300), meta(300), meta(300, torch.uint8), meta(300, torch.uint8), meta(2), meta(2), [1], **HP)


# ---- against bitsandbytes' AdamW8bit (CPU) and our 32-bit AdamW -----------------------------------
SHAPES = [(5000,), (300, 40), (4096,), (70, 131)]


def _run(opts_params, steps, seed=1, skip=False):
    """The same gradients into every (optimizer, params); parameter i gets none when t % (i + 2) == 0."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = []
        for i, p in enumerate(opts_params[0][1]):
            grads.append(None if skip and t > 0 and t % (i + 2) == 0 else torch.randn(p.shape, generator=gen))
        for opt, params in opts_params:
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            opt.step()


def _flat(ps):
    return torch.cat([p.detach().float().reshape(-1) for p in ps])


@requires_bnb
def test_one_step_matches_bitsandbytes_from_random_states():
    """Same random 8-bit states in both, one step: parameters agree to float rounding; bytes agree except
    where bitsandbytes' CPU quantiser (a 65536-bin grid over [-1, 1], bitsandbytes 0.50) picks another code
    than the nearest one: values within ~1.5e-5 * absmax of a decision point, or below ~3e-5 * absmax."""
    ps = [torch.randn(s) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    ob, o8 = bnb.optim.AdamW8bit(a, lr=1e-3), PagedAdamW(b, lr=1e-3, state_bits=8)
    _run([(ob, a), (o8, b)], 1)
    for x, y in zip(a, b):  # random states, identical in both
        sb, s8 = ob.state[x], o8.state[y]
        for k in ("state1", "state2"):
            s8[k].copy_(torch.randint(0, 256, x.shape, dtype=torch.uint8))
            sb[k].copy_(s8[k])
        for k in ("absmax1", "absmax2"):
            s8[k].copy_(torch.rand(s8[k].shape) * (0.1 if k == "absmax1" else 0.01))
            sb[k].copy_(s8[k])
    _run([(ob, a), (o8, b)], 1, seed=2)
    torch.testing.assert_close(_flat(b), _flat(a), rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        sb, s8 = ob.state[x], o8.state[y]
        torch.testing.assert_close(s8["absmax1"], sb["absmax1"], rtol=1e-6, atol=0)
        for k, signed, frac in (("state1", True, 5e-3), ("state2", False, 2e-2)):
            diff = (s8[k] != sb[k]).float().mean().item()
            print(f"one step from random states: {k} {diff:.2e} of the bytes differ from bitsandbytes'")
            assert diff <= frac, f"{k}: {diff:.2e} of the bytes differ"
            code = dynamic_map(signed)
            ours, theirs = code[s8[k].reshape(-1).long()], code[sb[k].reshape(-1).long()]
            q = s8[k].reshape(-1).long()
            gap = torch.maximum(code[(q + 1).clamp(max=255)] - code[q], code[q] - code[(q - 1).clamp(min=0)])
            assert ((ours - theirs).abs() <= gap + 3.1e-5).all()  # in units of absmax


@requires_bnb
@pytest.mark.skipif(bnb is None or not bnb.__version__.startswith("0.50"),
                    reason="documents bitsandbytes 0.50's CPU quantiser")
def test_reference_with_bitsandbytes_grid_reproduces_bitsandbytes_exactly():
    """Why our bytes differ from bitsandbytes' CPU ones: the reference above, with bitsandbytes' m update
    (m * beta1 + (1 - beta1) * g) and its 65536-bin grid quantiser instead of the nearest code, reproduces
    AdamW8bit bit for bit over 30 steps."""
    n = 5000  # >= min_8bit_size
    p0 = torch.randn(n)
    a = p0.clone().requires_grad_()
    ob = bnb.optim.AdamW8bit([a], lr=1e-3, weight_decay=0.01)
    p = p0.clone()
    q1, q2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(-(-n // B)), torch.zeros(-(-n // B))
    codes = dynamic_map(True), dynamic_map(False)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    luts = [torch.searchsorted(0.5 * (c[:-1] + c[1:]), grid, side="left") for c in codes]
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 31):
        g = torch.randn(n, generator=gen)
        a.grad = g.clone()
        ob.step()
        m, v = ref_dequantize(q1, a1, codes[0]), ref_dequantize(q2, a2, codes[1])
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=1 - 0.999)
        denom = (v.sqrt() / math.sqrt(1 - 0.999**t)).add_(1e-8)
        p.mul_(1 - 1e-3 * 0.01).addcdiv_(m, denom, value=-1e-3 / (1 - 0.9**t))
        for x, q, am, lut in ((m, q1, a1, luts[0]), (v, q2, a2, luts[1])):
            xb = F.pad(x, (0, -n % B)).view(-1, B)
            am.copy_(xb.abs().amax(1))
            normed = (xb * (1.0 / am)[:, None]).reshape(-1)[:n].clamp(-1, 1)
            q.copy_(lut[((normed + 1.0) * 0.5 * 65535 + 0.5).long()])
    st = ob.state[a]
    assert torch.equal(a.detach(), p) and torch.equal(st["state1"], q1) and torch.equal(st["state2"], q2)


@requires_bnb
def test_100_steps_close_to_bitsandbytes_and_to_32bit():
    """Measured (docs/optim.md): after 100 steps of N(0, 1) gradients, |8-bit - 32-bit| / |32-bit movement| is
    ~2.2% for both lorart and bitsandbytes, the largest element difference ~1.1 lr; lorart vs bitsandbytes
    differ by at most ~1.1 lr per element (their quantisers pick different codes for a few values)."""
    ps = [torch.randn(s) for s in SHAPES]
    mk = lambda: [p.clone().requires_grad_() for p in ps]  # noqa: E731
    a, b, c = mk(), mk(), mk()
    lr = 1e-3
    ob = bnb.optim.AdamW8bit(a, lr=lr, weight_decay=0.01)
    o8 = PagedAdamW(b, lr=lr, weight_decay=0.01, state_bits=8)
    o32 = PagedAdamW(c, lr=lr, weight_decay=0.01)
    _run([(ob, a), (o8, b), (o32, c)], 100, skip=True)
    p0, pb, p8, p32 = _flat(ps), _flat(a), _flat(b), _flat(c)
    move = (p32 - p0).norm()
    rel8, relb = ((p8 - p32).norm() / move).item(), ((pb - p32).norm() / move).item()
    print(f"100 steps: |8-32|/|move| lorart {rel8:.4f} bnb {relb:.4f}; max |8-32| lorart "
          f"{(p8 - p32).abs().max() / lr:.3f} lr, bnb {(pb - p32).abs().max() / lr:.3f} lr; max |lorart-bnb| "
          f"{(p8 - pb).abs().max() / lr:.3f} lr, |lorart-bnb|/|move| {((p8 - pb).norm() / move).item():.4f}")
    assert rel8 < 0.03 and relb < 0.03 and rel8 < 1.1 * relb
    assert (p8 - p32).abs().max() < 1.5 * lr
    assert (p8 - pb).abs().max() < 1.5 * lr and ((p8 - pb).norm() / move) < 0.01
    for x, y in zip(a, b):
        assert ob.state[x]["step"] == o8.state[y]["step"]


def test_100_steps_within_tolerance_of_32bit():
    """Without bitsandbytes: the documented tolerance against our own 32-bit AdamW."""
    ps = [torch.randn(s) for s in SHAPES]
    b = [p.clone().requires_grad_() for p in ps]
    c = [p.clone().requires_grad_() for p in ps]
    lr = 1e-2
    o8, o32 = PagedAdamW(b, lr=lr, state_bits=8), PagedAdamW(c, lr=lr)
    _run([(o8, b), (o32, c)], 100, seed=5)
    p0, p8, p32 = _flat(ps), _flat(b), _flat(c)
    assert ((p8 - p32).norm() / (p32 - p0).norm()) < 0.03
    assert (p8 - p32).abs().max() < 1.5 * lr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_match_reference(dtype):
    shapes = [(700,), (20, 50)]
    ps = [torch.randn(s).to(dtype) for s in shapes]
    b = [p.clone().requires_grad_() for p in ps]
    opt = PagedAdamW(b, lr=1e-2, weight_decay=0.1, state_bits=8, min_8bit_size=0)
    ref_p = [p.clone() for p in ps]
    ref_st = _states(shapes, "cpu", random=False)
    for t in range(1, 11):
        for i, s in enumerate(shapes):
            g = torch.randn(s).to(dtype)
            b[i].grad = g.clone()
            ref_step(ref_p[i], g, *ref_st[i], t, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        opt.step()
    for i in range(len(shapes)):
        assert opt.state[b[i]]["state1"].dtype == torch.uint8 and b[i].dtype == dtype
        torch.testing.assert_close(b[i].detach().float(), ref_p[i].float(), rtol=0,
                                   atol=float(ref_p[i].float().abs().max()) * 2**-7)
        assert_bytes_close(opt.state[b[i]]["state1"], ref_st[i][0], frac=2e-2)


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    for args, kw in sample_inputs("cpu", dtype):
        cpu = [[t.clone() for t in a] if isinstance(a, list) and a and torch.is_tensor(a[0]) else a for a in args]
        gpu = [[t.cuda() for t in a] if isinstance(a, list) and a and torch.is_tensor(a[0]) else a for a in args]
        adamw8_step_(*cpu, **kw)
        adamw8_step_(*gpu, **kw)
        torch.cuda.synchronize()
        for i in range(len(cpu[0])):
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=2**-7)
            torch.testing.assert_close(gpu[0][i].cpu().float(), cpu[0][i].float(), **tol)
            for k in (2, 3):  # FMA contraction on the GPU may move a value across a decision point
                assert_bytes_close(gpu[k][i].cpu(), cpu[k][i])
            for k in (4, 5):
                torch.testing.assert_close(gpu[k][i].cpu(), cpu[k][i], rtol=1e-5, atol=0)


@requires_cuda
@pytest.mark.cuda
@requires_bnb
def test_cuda_close_to_bitsandbytes_cuda():
    ps = [torch.randn(s, device="cuda") for s in SHAPES]
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    ob, o8 = bnb.optim.AdamW8bit(a, lr=1e-3), PagedAdamW(b, lr=1e-3, state_bits=8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).cuda()
            x.grad, y.grad = g.clone(), g.clone()
        ob.step()
        o8.step()
    move = (_flat(b) - _flat(ps)).norm()
    assert ((_flat(b) - _flat(a)).norm() / move) < 0.03
