import subprocess
import sys

import pytest
import torch

import lorart
from lorart.ops import _common


def test_build_info_fields():
    info = lorart.build_info()
    assert info["version"] == lorart.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_architectures"]
        assert info["cuda_runtime_version"] >= 11000
    assert info["gpu_usable"] == (info["cuda_devices"] > 0)
    if not info["gpu_usable"]:
        assert info["gpu_unusable_reason"]


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "lorart", "info"], capture_output=True, text=True, check=True)
    assert "CUDA kernels" in out.stdout and "GPU usable now" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_cuda_tensor_error_without_gpu():
    fake = torch.empty(2, device="meta")
    with pytest.raises(RuntimeError, match="supports cpu and cuda"):
        _common.check_device(fake, "x")


def test_num_threads_roundtrip():
    n = lorart._core._C.get_num_threads()
    lorart._core._C.set_num_threads(1)
    assert lorart._core._C.get_num_threads() == 1
    lorart._core._C.set_num_threads(n)
