"""Shared pytest fixtures: the devices every op is tested on.

CUDA cases run only where torch sees a GPU and lorart's CUDA kernels can use it;
elsewhere they are skipped (with the reason), never silently dropped.
"""
from __future__ import annotations

import pytest
import torch

import lorart


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if not lorart.cuda_compiled():
        return "lorart was built without CUDA kernels"
    if not lorart.cuda_usable():
        return "lorart cannot use the GPU: " + lorart.build_info().get("gpu_unusable_reason", "")
    return None


CUDA_SKIP = _cuda_skip_reason()
requires_cuda = pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
