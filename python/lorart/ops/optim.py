"""Optimizer ops: torch.ops.lorart.adamw_step_ (fused multi-tensor AdamW, in place, float32 states) and
torch.ops.lorart.adamw8_step_ (the same with 8-bit blockwise states, bitsandbytes' layout), plus the
8-bit states' dynamic maps and blockwise (de)quantisation used to convert states."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _C, stream
from ._define import Op, randn

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 256  # elements per absmax of the 8-bit states


def check_adamw_hparams(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Clear errors for hyper-parameters AdamW cannot use (shared by the op and the optimizer)."""
    for name, val in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0.0):
            raise ValueError(f"lorart: argument `{name}`: expected a finite float >= 0, got {val!r}")
    for name, val in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(val, (int, float)) and 0.0 <= val < 1.0):
            raise ValueError(f"lorart: argument `{name}`: expected a float in [0, 1), got {val!r}")


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _check(op, params, grads, states, steps, lr, beta1, beta2, eps, weight_decay) -> None:
    """Checks shared by the ops and their fakes. states: [(name, tensors, dtype, 8-bit absmax?)]."""
    check_adamw_hparams(lr, beta1, beta2, eps, weight_decay)
    n = len(params)
    lists = [("params", params), ("grads", grads)] + [(s[0], s[1]) for s in states] + [("steps", steps)]
    if any(len(ts) != n for _, ts in lists):
        names = ", ".join(nm for nm, _ in lists[:-1])
        raise ValueError(f"lorart: {op}: expected {names} and steps of one length, got "
                         + ", ".join(str(len(ts)) for _, ts in lists))
    for i in range(n):
        p, g = params[i], grads[i]
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"lorart: argument `params[{i}]`: expected dtype float32|bfloat16|float16, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"lorart: argument `grads[{i}]`: expected dtype {p.dtype} (as params[{i}]), got {g.dtype}")
        checks = [(f"params[{i}]", p, p.numel(), f"as params[{i}]"), (f"grads[{i}]", g, p.numel(), f"as params[{i}]")]
        for name, ts, dtype, per_block in states:
            t = ts[i]
            if t.dtype != dtype:
                raise TypeError(f"lorart: argument `{name}[{i}]`: expected dtype {str(dtype).replace('torch.', '')}, "
                                f"got {t.dtype}")
            count, what = ((_blocks(p.numel()), f"ceil(params[{i}].numel / {BLOCK})") if per_block
                           else (p.numel(), f"as params[{i}]"))
            checks.append((f"{name}[{i}]", t, count, what))
        for name, t, count, what in checks:
            if t.numel() != count:
                raise ValueError(f"lorart: argument `{name}`: expected {count} elements ({what}), "
                                 f"got {t.numel()} (shape {tuple(t.shape)})")
            if not t.is_contiguous():
                raise ValueError(f"lorart: argument `{name}`: expected a contiguous tensor")
            if t.device != params[0].device:
                raise ValueError(f"lorart: arguments `params[0]` and `{name}` must be on the same device, "
                                 f"got {params[0].device} and {t.device}")
        if steps[i] < 1:
            raise ValueError(f"lorart: argument `steps[{i}]`: expected >= 1 (the count after this step), got {steps[i]}")


def _states32(exp_avgs, exp_avg_sqs):
    return [("exp_avgs", exp_avgs, torch.float32, False), ("exp_avg_sqs", exp_avg_sqs, torch.float32, False)]


def _states8(q_exp_avgs, q_exp_avg_sqs, absmax_exp_avgs, absmax_exp_avg_sqs):
    return [("q_exp_avgs", q_exp_avgs, torch.uint8, False), ("q_exp_avg_sqs", q_exp_avg_sqs, torch.uint8, False),
            ("absmax_exp_avgs", absmax_exp_avgs, torch.float32, True),
            ("absmax_exp_avg_sqs", absmax_exp_avg_sqs, torch.float32, True)]


def _run(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
         steps: list[int], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
         maximize: bool = False) -> None:
    if params:
        _C.adamw_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [int(s) for s in steps],
                      float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize),
                      stream(params[0]))


def _check32(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize=False):
    _check("adamw_step_", params, grads, _states32(exp_avgs, exp_avg_sqs), steps, lr, beta1, beta2, eps,
           weight_decay)


_HP = (1e-2, 0.9, 0.999, 1e-8, 0.01)  # lr, beta1, beta2, eps, weight_decay


def _samples32(device, dtype):
    if dtype not in _PARAM_DTYPES:
        return []
    shapes = ((8, 6), (300,), (0, 3))
    p = [randn(i, *s, dtype=dtype, device=device) for i, s in enumerate(shapes)]
    g = [randn(10 + i, *s, dtype=dtype, device=device) for i, s in enumerate(shapes)]
    m = [randn(20 + i, *s, device=device, scale=0.1) for i, s in enumerate(shapes)]
    v = [randn(30 + i, *s, device=device, scale=0.1).abs() for i, s in enumerate(shapes)]
    return [(p, g, m, v, [1, 3, 1]) + _HP + (False,), (p[:1], g[:1], m[:1], v[:1], [2]) + _HP + (True,)]


adamw_step_ = Op("adamw_step_", _run, check=_check32, fake=lambda *a: None,
                 mutates=("params", "exp_avgs", "exp_avg_sqs"), device="params", samples=_samples32)
"""One AdamW step (decoupled weight decay, torch.optim.AdamW's arithmetic) over lists of tensors, in place.

params: float32|bfloat16|float16; grads: params' dtypes; exp_avgs, exp_avg_sqs: float32; all contiguous, element
counts matching per index (shapes may differ), one device. steps[i]: tensor i's step count after this step
(>= 1). CUDA: one fused launch on torch's current stream, no host synchronisation. Called in eager mode it skips
the dispatcher (~50-100 us here) and bumps the version counters as the op does."""


def _run8(params: list[Tensor], grads: list[Tensor], q_exp_avgs: list[Tensor], q_exp_avg_sqs: list[Tensor],
          absmax_exp_avgs: list[Tensor], absmax_exp_avg_sqs: list[Tensor], steps: list[int], lr: float,
          beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool = False) -> None:
    if params:
        _C.adamw8_step(list(params), list(grads), list(q_exp_avgs), list(q_exp_avg_sqs), list(absmax_exp_avgs),
                       list(absmax_exp_avg_sqs), [int(s) for s in steps], float(lr), float(beta1), float(beta2),
                       float(eps), float(weight_decay), bool(maximize), stream(params[0]))


def _check8(params, grads, q1, q2, a1, a2, steps, lr, beta1, beta2, eps, weight_decay, maximize=False):
    _check("adamw8_step_", params, grads, _states8(q1, q2, a1, a2), steps, lr, beta1, beta2, eps, weight_decay)


def _samples8(device, dtype):
    if dtype not in _PARAM_DTYPES:
        return []
    shapes = ((8, 40), (600,))
    p = [randn(i, *s, dtype=dtype, device=device) for i, s in enumerate(shapes)]
    g = [randn(10 + i, *s, dtype=dtype, device=device) for i, s in enumerate(shapes)]
    q1 = [torch.randint(0, 256, s, dtype=torch.uint8, generator=torch.Generator().manual_seed(i)).to(device)
          for i, s in enumerate(shapes)]
    q2 = [torch.randint(0, 256, s, dtype=torch.uint8, generator=torch.Generator().manual_seed(9 + i)).to(device)
          for i, s in enumerate(shapes)]
    a1 = [randn(20 + i, _blocks(t.numel()), device=device).abs() for i, t in enumerate(p)]
    a2 = [randn(30 + i, _blocks(t.numel()), device=device).abs() for i, t in enumerate(p)]
    return [(p, g, q1, q2, a1, a2, [1, 4]) + _HP + (False,)]


adamw8_step_ = Op("adamw8_step_", _run8, check=_check8, fake=lambda *a: None,
                  mutates=("params", "q_exp_avgs", "q_exp_avg_sqs", "absmax_exp_avgs", "absmax_exp_avg_sqs"),
                  device="params", samples=_samples8)
"""One AdamW step with 8-bit blockwise states (bitsandbytes' 8-bit Adam layout), in place.

params: float32|bfloat16|float16; grads: params' dtypes; q_exp_avgs, q_exp_avg_sqs: uint8 with params' element
counts; absmax_exp_avgs, absmax_exp_avg_sqs: float32 with ceil(numel / 256) elements; all contiguous, one device.
Byte q of block b stands for code[q] * absmax[b] (dynamic_map(signed=True) for exp_avg, dynamic_map(signed=False)
for exp_avg_sq). Fresh states: zero bytes and zero absmax."""


# ---- the 8-bit states' maps and conversions (host side) ---------------------------------
_MAPS: dict[bool, Tensor] = {}


def dynamic_map(signed: bool = True) -> Tensor:
    """bitsandbytes' sorted 256-entry dynamic map (create_dynamic_map(signed)), float32 on the CPU.
    Signed: exp_avg's code; unsigned: exp_avg_sq's. Returns a new tensor (the cached one is never handed out)."""
    if signed not in _MAPS:
        _MAPS[signed] = torch.tensor(_C.dynamic_map(bool(signed)), dtype=torch.float32)
    return _MAPS[signed].clone()


def quantize_blockwise8(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """x (any float dtype/device) -> (q uint8 of x's shape, absmax float32 [ceil(numel / 256)]) on the CPU,
    with the 8-bit kernels' rule (absmax = max |x| per 256 elements, q = nearest code to x / absmax)."""
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    q = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(_blocks(x.numel()), dtype=torch.float32)
    _C.quantize_blockwise8(x, bool(signed), q, absmax)
    return q, absmax


def dequantize_blockwise8(q: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """code[q] * absmax (float32, q's shape, on the CPU)."""
    q = q.detach().cpu().contiguous()
    absmax = absmax.detach().to(device="cpu", dtype=torch.float32).contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    _C.dequantize_blockwise8(q, absmax, bool(signed), out)
    return out


__all__ = ["adamw_step_", "adamw8_step_", "check_adamw_hparams",
           "dynamic_map", "quantize_blockwise8", "dequantize_blockwise8", "BLOCK"]
