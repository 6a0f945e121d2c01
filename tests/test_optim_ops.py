"""torch.ops.lorart.adamw_step_: the op against a pure-PyTorch AdamW step, opcheck, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import lorart  # noqa: F401  (registers the ops)
from lorart.ops.optim import adamw_step_

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _reference(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, maximize=False):
    g = -g if maximize else g
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


def sample_inputs(device):
    shapes = [(3,), (8, 9), (2, 3, 4), (0,), (4097,)]
    out = []
    for steps in ([1] * len(shapes), [1, 5, 2, 7, 3]):
        ps = [torch.randn(s, device=device) for s in shapes]
        gs = [torch.randn(s, device=device) for s in shapes]
        ms = [torch.randn(s, device=device) * 0.1 for s in shapes]
        vs = [torch.rand(s, device=device) * 0.1 for s in shapes]
        out.append(((ps, gs, ms, vs, steps), dict(HP)))
    return out


def test_op_matches_reference(device):
    for args, kw in sample_inputs(device):
        ps, gs, ms, vs, steps = [list(a) if isinstance(a, list) else a for a in args]
        ref = [[t.clone() for t in lst] for lst in (ps, gs, ms, vs)]
        adamw_step_(ps, gs, ms, vs, steps, **kw)
        for i in range(len(ps)):
            _reference(ref[0][i], ref[1][i], ref[2][i], ref[3][i], steps[i], **kw)
            torch.testing.assert_close(ps[i], ref[0][i], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ms[i], ref[2][i], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(vs[i], ref[3][i], rtol=1e-6, atol=1e-8)


def test_op_unaligned_slices(device):
    """Slices that start at an odd element take the scalar path; results still match."""
    base = [torch.randn(1001, device=device) for _ in range(4)]
    p, g, m, v = (t[1:] for t in base)
    m.mul_(0.1)
    v.abs_().mul_(0.1)
    ref = [t.clone() for t in (p, g, m, v)]
    adamw_step_([p], [g], [m], [v], [3], **HP)
    _reference(*ref, 3, **HP)
    torch.testing.assert_close(p, ref[0], rtol=1e-6, atol=1e-7)


def _one(device="cpu", dtype=torch.float32, n=4):
    return [torch.zeros(n, device=device, dtype=dtype)]


@pytest.mark.parametrize("change, exc, match", [
    (dict(lr=-1.0), ValueError, "`lr`"),
    (dict(beta1=1.0), ValueError, "`beta1`"),
    (dict(beta2=1.5), ValueError, "`beta2`"),
    (dict(eps=-1.0), ValueError, "`eps`"),
    (dict(eps=float("nan")), ValueError, "`eps`"),
])
def test_op_bad_hparams(change, exc, match):
    kw = {**HP, **change}
    with pytest.raises(exc, match=match):
        adamw_step_(_one(), _one(), _one(), _one(), [1], **kw)


def test_op_bad_tensors():
    with pytest.raises(ValueError, match="one length"):
        adamw_step_(_one() * 2, _one(), _one(), _one(), [1], **HP)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        adamw_step_(_one(), _one(dtype=torch.float16), _one(), _one(), [1], **HP)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\]"):
        adamw_step_(_one(), _one(), _one(dtype=torch.bfloat16), _one(), [1], **HP)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\].*5 elements|expected 4 elements"):
        adamw_step_(_one(), _one(), _one(), _one(n=5), [1], **HP)
    with pytest.raises(ValueError, match=r"contiguous"):
        adamw_step_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], [torch.zeros(16)], [torch.zeros(16)], [1], **HP)
    with pytest.raises(ValueError, match=r"steps\[0\]"):
        adamw_step_(_one(), _one(), _one(), _one(), [0], **HP)
    # meta tensors take the fake implementation (shape checks only): that is how torch.compile traces the op
    adamw_step_(_one("meta"), _one("meta"), _one("meta"), _one("meta"), [1], **HP)


def test_c_level_checks():
    """The C++ API checks on its own (for C++ callers that bypass the Python layer)."""
    from lorart.ops._common import _C
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="`lr`"):
        _C.adamw_step([t], [t], [t], [t], [1], -1.0, 0.9, 0.999, 1e-8, 0.0, False, 0)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\]"):
        _C.adamw_step([t], [t], [t], [torch.zeros(3)], [1], 1.0, 0.9, 0.999, 1e-8, 0.0,
                      False, 0)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        d = torch.zeros(4, dtype=torch.float64)
        _C.adamw_step([d], [d], [t], [t], [1], 1.0, 0.9, 0.999, 1e-8, 0.0, False, 0)
