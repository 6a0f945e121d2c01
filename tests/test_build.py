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


def test_view_roundtrip_shapes():
    t = torch.randn(3, 4)[:, 1:]
    v = _common.view(t)
    assert v[2] == (3, 3) and v[3] == (4, 1) and v[4] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_cuda_tensor_error_without_gpu():
    fake = torch.empty(2, device="meta")
    with pytest.raises(RuntimeError, match="supports cpu and cuda"):
        _common.check_device(fake, "x")


def test_num_threads_roundtrip():
    n = lorart.get_num_threads()
    lorart.set_num_threads(1)
    assert lorart.get_num_threads() == 1 == lorart.build_info()["cpu_threads"]
    lorart.set_num_threads(n)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="argument `n`"):
            lorart.set_num_threads(bad)
    assert lorart.get_num_threads() == n


def _cuda_view(shape, code):
    """A view that claims to live on cuda:0 (a dangling pointer: it must never be dereferenced)."""
    strides, st = [], 1
    for s in reversed(shape):
        strides.insert(0, st)
        st *= s
    return (0x1000, code, tuple(shape), tuple(strides), 1, 0)


@pytest.mark.skipif(lorart.cuda_usable(), reason="checks the error where no GPU is usable")
def test_cuda_view_without_usable_gpu_is_a_clear_error():
    """A CUDA tensor reaching the core on a machine without a usable GPU (or a build without CUDA kernels)
    raises RuntimeError naming the cause; nothing is dereferenced."""
    C = lorart._core._C
    packed, absmax, out = _cuda_view([32, 1], 4), _cuda_view([1], 0), _cuda_view([8, 8], 0)
    with pytest.raises(RuntimeError) as e:
        C.nf4_dequantize(packed, absmax, None, None, 0.0, 64, 8, 8, out, 0)
    msg = str(e.value)
    assert ("CUDA driver" in msg or "GPU" in msg) if lorart.cuda_compiled() else "without CUDA kernels" in msg
