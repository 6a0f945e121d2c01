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
    n = lorart.get_num_threads()
    lorart.set_num_threads(1)
    assert lorart.get_num_threads() == 1 == lorart.build_info()["cpu_threads"]
    lorart.set_num_threads(n)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="argument `n`"):
            lorart.set_num_threads(bad)
    assert lorart.get_num_threads() == n


def test_info_reports_cpu_gpus_and_extras():
    info = lorart.system_info()
    assert set(info["cpu"]) >= {"name", "native_bf16", "avx512_bf16", "amx_bf16", "torch_isa"}
    assert info["cpu"]["native_bf16"] == (info["cpu"]["avx512_bf16"] or info["cpu"]["amx_bf16"]
                                          or info["cpu"]["arm_bf16"])
    assert info["extras"]["test"]["installed"]  # this suite runs with the test extra
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    text = lorart.format_build_info(info)
    assert "native bf16: " in text and "AMX: " in text and "extra [data]: " in text


def test_info_names_a_missing_extra(monkeypatch):
    import importlib.util

    from lorart import sysinfo
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    ex = sysinfo.extras()
    assert ex["data"] == {"installed": False, "missing": ["pyarrow"], "versions": {}}
    text = "\n".join(sysinfo.format_info({"cpu": sysinfo.cpu_info(), "gpus": [], "extras": ex}))
    assert 'extra [data]: missing pyarrow (pip install "lorart[data]")' in text


def test_extras_table_matches_pyproject():
    import os
    import re

    from lorart.sysinfo import EXTRAS
    path = os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")
    if not os.path.exists(path):
        pytest.skip("no source tree")
    text = open(path, encoding="utf-8").read()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = {m.group(1): sorted(re.findall(r'"([A-Za-z0-9_.-]+)', m.group(2)))
                for m in re.finditer(r"^(\w+) = \[(.*?)\]", section, re.M)}
    assert declared == {k: sorted(d for d, _ in v) for k, v in EXTRAS.items()}


@pytest.mark.parametrize("cc, compiled, expected", [
    (90, "80,90", "native"), (86, "80,90", "native"), (89, "80;90", "native"), (75, "80,90", "none"),
    (120, "80,90", "ptx"), (100, "90-real", "none"), (100, "80-virtual", "ptx"), (90, "90a", "native"),
    (100, "90a", "none"), (80, "86", "none"), (90, "", "none"),
])
def test_arch_support(cc, compiled, expected):
    from lorart.sysinfo import arch_support
    assert arch_support(cc, compiled) == expected
