"""Optimizer ops: torch.ops.lorart.adamw_step_ (fused multi-tensor AdamW, in place)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import _C, check_device, stream, view

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_adamw_hparams(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Clear errors for hyper-parameters AdamW cannot use (shared by the op and the optimizer)."""
    for name, val in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0.0):
            raise ValueError(f"lorart: argument `{name}`: expected a finite float >= 0, got {val!r}")
    for name, val in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(val, (int, float)) and 0.0 <= val < 1.0):
            raise ValueError(f"lorart: argument `{name}`: expected a float in [0, 1), got {val!r}")


def _check(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay) -> None:
    check_adamw_hparams(lr, beta1, beta2, eps, weight_decay)
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n):
        raise ValueError(
            "lorart: adamw_step_: expected params, grads, exp_avgs, exp_avg_sqs and steps of one length, got "
            f"{n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, {len(steps)}"
        )
    for i in range(n):
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"lorart: argument `params[{i}]`: expected dtype float32|bfloat16|float16, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"lorart: argument `grads[{i}]`: expected dtype {p.dtype} (as params[{i}]), got {g.dtype}")
        for name, t in ((f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v)):
            if t.dtype != torch.float32:
                raise TypeError(f"lorart: argument `{name}`: expected dtype float32, got {t.dtype}")
        for name, t in ((f"params[{i}]", p), (f"grads[{i}]", g), (f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v)):
            if t.numel() != p.numel():
                raise ValueError(f"lorart: argument `{name}`: expected {p.numel()} elements (as params[{i}]), "
                                 f"got {t.numel()} (shape {tuple(t.shape)})")
            if not t.is_contiguous():
                raise ValueError(f"lorart: argument `{name}`: expected a contiguous tensor")
            if t.device != params[0].device:
                raise ValueError(f"lorart: arguments `params[0]` and `{name}` must be on the same device, "
                                 f"got {params[0].device} and {t.device}")
        if steps[i] < 1:
            raise ValueError(f"lorart: argument `steps[{i}]`: expected >= 1 (the count after this step), got {steps[i]}")


@torch.library.custom_op("lorart::adamw_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """One AdamW step (decoupled weight decay, torch.optim.AdamW's arithmetic) over lists of tensors, in place.

    params: float32|bfloat16|float16; grads: params' dtypes; exp_avgs, exp_avg_sqs: float32; all contiguous,
    element counts matching per index (shapes may differ), one device. steps[i]: tensor i's step count after
    this step (>= 1). CUDA: one fused launch on torch's current stream, no host synchronisation.
    """
    _run(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize)


def _run(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay)
    if not params:
        return
    check_device(params[0], "params[0]")
    _C.adamw_step(
        [view(t) for t in params], [view(t) for t in grads], [view(t) for t in exp_avgs],
        [view(t) for t in exp_avg_sqs], [int(s) for s in steps], float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), bool(maximize), stream(params[0]),
    )


def adamw_step_eager(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                     maximize=False) -> None:
    """adamw_step_ for optimizers: the same checks and kernel without the dispatcher's per-call cost
    (~50-100 us here), version counters bumped as the op does; the op itself while tracing."""
    if torch.compiler.is_compiling():
        torch.ops.lorart.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                                     weight_decay, maximize)
        return
    _run(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize)
    for ts in (params, exp_avgs, exp_avg_sqs):
        torch.autograd.graph.increment_version(ts)


@adamw_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize=False):
    _check(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay)
    return None


__all__ = ["adamw_step_", "adamw_step_eager", "check_adamw_hparams"]
