"""Glue between torch tensors and lorart._C: streams, device checks.

Ops pass torch tensors to lorart._C as they are: the pybind11 type caster (cpp/python/bind.h) reads each
tensor's pointer, dtype, shape, strides and device at call time, and the tensor, an argument of the call,
stays alive until the call returns. The core checks the layout its kernels assume (contiguity, unit stride)
and names the argument when it does not hold. CUDA work goes to `stream(t)`.
"""
from __future__ import annotations

import torch

from .._core import _C, cuda_compiled, cuda_status

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream(t: torch.Tensor) -> int:
    """torch's current CUDA stream for t's device (0 for CPU tensors)."""
    if not t.is_cuda:
        return 0
    if _raw_stream is not None:  # the raw cudaStream_t without building a torch.cuda.Stream object
        return _raw_stream(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


def check_device(t: torch.Tensor, name: str) -> None:
    """Clear errors for devices this build or machine cannot run."""
    if t.device.type == "cpu":
        return
    if t.device.type != "cuda":
        raise RuntimeError(f"lorart: argument `{name}` is on {t.device}; lorart supports cpu and cuda tensors")
    if not cuda_compiled():
        raise RuntimeError(
            f"lorart: argument `{name}` is a CUDA tensor but this lorart build has no CUDA kernels "
            "(nvcc was not found when it was built; reinstall with CUDA available, LORART_CUDA=ON)"
        )
    n, why = cuda_status()
    if n == 0:
        raise RuntimeError(f"lorart: argument `{name}` is a CUDA tensor but lorart cannot use the GPU: {why}")


def check_dtype(t: torch.Tensor, name: str, allowed) -> None:
    if t.dtype not in allowed:
        exp = "|".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"lorart: argument `{name}`: expected dtype {exp}, got {str(t.dtype).replace('torch.', '')}")


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    devs = [(n, t.device) for n, t in named if t is not None]
    for n, d in devs[1:]:
        if d != devs[0][1]:
            raise ValueError(
                f"lorart: arguments `{devs[0][0]}` and `{n}` must be on the same device, got {devs[0][1]} and {d}"
            )


def runs_on(t: torch.Tensor) -> bool:
    """Whether lorart's fused elementwise/row kernels (act, norm) are the ones to use for t; callers fall back
    to plain torch ops otherwise: this build can run them on t's device, and t is not float16 on the CPU (our
    scalar fp16 conversions make those CPU loops several times slower than torch's)."""
    if t.device.type == "cpu":
        return t.dtype != torch.float16
    if t.device.type != "cuda":
        return False
    ok = _cuda_ok.get("ok")
    if ok is None:
        ok = _cuda_ok["ok"] = bool(cuda_compiled()) and cuda_status()[0] > 0
    return ok


_cuda_ok: dict = {}


__all__ = ["_C", "stream", "check_device", "check_dtype", "check_same_device", "FLOAT_DTYPES", "runs_on"]
