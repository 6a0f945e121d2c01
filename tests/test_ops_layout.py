"""Tensor lifetimes at the boundary to lorart._C: tensors cross as themselves (the pybind11 caster reads the
live tensor, which the call keeps alive), so a kernel never reads a temporary freed before it ran; the core
refuses layouts its kernels do not handle, naming the argument. Every op's every tensor argument in other
layouts: tests/test_ops_conformance.py. CI runs both once more with MALLOC_PERTURB_ set, so that a freed buffer
reads as garbage instead of as the values it still held.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lorart
from lorart.ops.act import swiglu
from lorart.ops.norm import rms_norm


# ---- the repros of issue 11 (in a subprocess: they crashed the process) ------------------------------------------

REPROS = {
    "lora_merge_": "W=torch.randn(16,1<<20); A=torch.randn(1<<20,16).t(); B=torch.randn(16,16); ref=W+2.0*B@A; "
                   "torch.ops.lorart.lora_merge_(W, A, B, 2.0); print(float((W-ref).abs().max()))",
    "rms_norm": "x=torch.randn(4,4096); w=torch.randn(8192)[::2]; y,_=torch.ops.lorart.rms_norm(x, w, 1e-6); "
                "print(float((y - w*(x*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+1e-6))).abs().max()))",
    "nf4_dequantize": "w=lorart.nf4.quantize(torch.randn(64,256), 64, False); p=torch.empty(w.packed.numel(),2,"
                      "dtype=torch.uint8); p[:,0]=w.packed.view(-1); o=w.op_args()._replace(packed=p[:,0]); "
                      "y=lorart.ops.nf4.nf4_dequantize.dispatch(o, torch.float32); "
                      "print(float((y-w.dequantize()).abs().max()))",
}


def test_issue_repros_in_a_subprocess():
    """The issue's repros, in one fresh process with freed memory poisoned (they crashed or read garbage)."""
    code = "import torch, lorart\n" + "\n".join(f"{v}  # {k}" for k, v in sorted(REPROS.items()))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MALLOC_PERTURB_="165"))
    assert r.returncode == 0, r.stderr[-2000:]
    errs = [float(v) for v in r.stdout.split()]
    assert len(errs) == len(REPROS) and max(errs) < 1e-3, dict(zip(sorted(REPROS), errs))


# ---- every op, every tensor argument ------------------------------------------------------------------------------


# ---- the boundary itself ---------------------------------------------------------------------------------------

def test_core_takes_tensors_and_checks_layout():
    C = lorart._core._C
    x = torch.randn(8, 6)
    out = torch.empty(8, 6)
    C.lora_dropout(x, out, 0.0, 0, 0)
    assert torch.equal(out, x)
    with pytest.raises(ValueError, match="argument `x`: expected unit stride"):
        C.lora_dropout(x.t(), torch.empty(6, 8), 0.0, 0, 0)
    with pytest.raises(ValueError, match="argument `weight`: expected a contiguous tensor"):
        C.rms_norm(x, torch.randn(12)[::2], 1e-6, out, torch.empty(8), 0)
    with pytest.raises(TypeError):
        C.lora_dropout((x.data_ptr(), 0, (8, 6), (6, 1), 0, 0), out, 0.0, 0, 0)  # a bare pointer is refused
    with pytest.raises(TypeError, match="complex64"):
        C.lora_dropout(torch.zeros(2, 2, dtype=torch.complex64), out, 0.0, 0, 0)
    with pytest.raises(ValueError, match="meta"):
        C.lora_dropout(torch.zeros(2, 2, device="meta"), out, 0.0, 0, 0)


def test_zero_size_any_strides_is_contiguous():
    x = torch.empty(5, 0).t()  # strides (1, 5): contiguous to torch (no elements)
    assert x.is_contiguous()
    y = rms_norm(torch.empty(0, 8), torch.randn(8))
    assert y.shape == (0, 8)
    g = swiglu(x, torch.empty(0, 5))
    assert g.shape == (0, 5)
