"""The training dtype default (bf16 on CUDA and on CPUs with native bf16, else float32) and CPU bf16 training:
frozen base in bf16, the step under torch.autocast, float32 master LoRA weights."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import lorart
from lorart.training.evaluate import autocast_ctx
from lorart.training.options import TrainOptions
from lorart.training.setup import cpu_native_bf16, resolve_dtype

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("env,cpu_dtype", [("0", torch.float32), ("1", torch.bfloat16)])
def test_default_dtype_follows_native_bf16(monkeypatch, env, cpu_dtype):
    monkeypatch.setenv("LORART_CPU_BF16", env)
    assert cpu_native_bf16() == (env == "1")
    assert resolve_dtype(TrainOptions(), CPU) == cpu_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an sm_80+ GPU
    assert resolve_dtype(TrainOptions(), CUDA) == torch.bfloat16
    for asked, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # an explicit dtype always wins
        assert resolve_dtype(TrainOptions(dtype=asked), CPU) == dt


def test_detection_without_override(monkeypatch):
    monkeypatch.delenv("LORART_CPU_BF16", raising=False)
    from lorart.sysinfo import cpu_info
    assert cpu_native_bf16() == cpu_info()["native_bf16"]


@pytest.mark.parametrize("caps,flags,arch,native", [
    ({}, {"avx2", "fma"}, "x86_64", False),                                  # AVX2 only (e.g. this EPYC): emulated
    ({}, {"avx512f", "avx512bw"}, "x86_64", False),                          # AVX-512 without BF16: emulated
    ({}, {"avx512f", "avx512_bf16"}, "x86_64", True),                        # Cooper Lake, Zen 4, Sapphire Rapids
    ({}, {"amx_bf16", "amx_tile"}, "x86_64", True),
    ({"avx512_bf16": False, "amx_bf16": False}, {"avx512_bf16"}, "x86_64", False),  # torch's probe wins (OS off)
    ({"avx512_bf16": True, "amx_bf16": False}, {"avx2"}, "x86_64", True),
    ({}, {"fp", "asimd", "bf16", "i8mm"}, "aarch64", True),                   # Arm BF16 extension
    ({}, {"fp", "asimd"}, "aarch64", False),
])
def test_native_bf16_detection(monkeypatch, caps, flags, arch, native):
    """cpu_info's decision from torch's capability probe (when it answers) and the /proc/cpuinfo flags."""
    import platform

    from lorart import sysinfo
    monkeypatch.setattr(sysinfo, "_cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps), raising=False)
    monkeypatch.setattr(platform, "machine", lambda: arch)
    monkeypatch.delenv("LORART_CPU_BF16", raising=False)
    assert sysinfo.cpu_info()["native_bf16"] is native
    assert resolve_dtype(TrainOptions(), CPU) == (torch.bfloat16 if native else torch.float32)


def test_autocast_ctx():
    with autocast_ctx(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_ctx(CPU, torch.float32):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cpu_bf16_training(tmp_path, monkeypatch, method):
    """The default on a native-bf16 CPU: trains (loss goes down), masters float32, base bf16, autocast on."""
    monkeypatch.setenv("LORART_CPU_BF16", "1")
    seen = []
    import lorart.ops.loss as loss_mod
    real = loss_mod.linear_cross_entropy

    def spy(h, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), h.dtype))
        return real(h, *a, **k)

    monkeypatch.setattr("lorart.models.llama.linear_cross_entropy", spy)
    tiny = tiny_folder(tmp_path / "m")
    r = lorart.train(tiny, method=method, output_dir=tmp_path / "o", max_steps=6, lr=1e-2, batch_size=8,
                     max_seq_len=96, num_samples=0, progress=False, general_data=False, r=4, alpha=8, eval_every=6)
    assert r.after["eval_loss"] < r.before["eval_loss"] - 0.05
    trained = [p for p in r.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert r.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert seen and all(on for on, _ in seen) and all(dt == torch.bfloat16 for _, dt in seen)
