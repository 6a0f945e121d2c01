"""Shared pytest fixtures: the devices every op is tested on.

CUDA cases run only where torch sees a GPU and lorart's CUDA kernels can use it;
elsewhere they are skipped (with the reason), never silently dropped.
"""
from __future__ import annotations

import os

import pytest
import torch

import lorart

# CPU runs train in float32 unless a test asks otherwise, whatever the host's bf16 support (the default dtype of
# lorart.train follows it: lorart.training.setup.resolve_dtype); subprocesses inherit this
os.environ.setdefault("LORART_CPU_BF16", "0")


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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads large models or runs for more than 30 s")


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct default, loaded once per session (fp32)."""
    from lorart.models import default_model_path, load_model
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model(path, dtype=torch.float32, cache=False)  # always test the GGUF path
