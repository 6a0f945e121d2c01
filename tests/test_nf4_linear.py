"""lorart.nn.NF4Linear and NF4Weight serialization errors."""
from __future__ import annotations

import pytest
import torch

from lorart import nf4
from lorart.nn import NF4Linear
from nf4_reference import reference_dequantize_weight


def _ref_weight(layer):
    return reference_dequantize_weight(layer.weight)


@pytest.mark.parametrize("bias,train_bias", [(True, True), (True, False), (False, False)])
def test_forward_backward(device, bias, train_bias):
    lin = torch.nn.Linear(96, 40, bias=bias).to(device)
    layer = NF4Linear.from_linear(lin, blocksize=64, train_bias=train_bias)
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert isinstance(layer.weight, nf4.NF4Weight) and layer.weight.shape == (40, 96)
    x = torch.randn(2, 3, 96, device=device, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    w = _ref_weight(layer).to(device)
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ w.T + (lin.bias.detach() if bias else 0)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == (1 if train_bias else 0)
    if train_bias:
        torch.testing.assert_close(layer.bias.grad, (2 * y2).detach().reshape(-1, 40).sum(0), atol=1e-3, rtol=1e-4)


def test_compute_dtype_casts_input():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 16), compute_dtype=torch.bfloat16)
    x = torch.randn(5, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = (x.bfloat16() @ layer.weight.dequantize(torch.bfloat16).T + layer.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref, atol=5e-2, rtol=2e-2)


def test_state_dict_round_trip_and_to():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 48))
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]
    other = NF4Linear.from_linear(torch.nn.Linear(64, 48), double_quant=False, blocksize=128)
    res = other.load_state_dict(sd)
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(other.weight.dequantize(), layer.weight.dequantize())
    assert other.weight.blocksize == 64 and other.weight.double_quant
    seq = torch.nn.Sequential(layer)
    assert "0.weight.absmax" in seq.state_dict()
    moved = layer.to("cpu")
    assert moved.weight.packed.device.type == "cpu"


def test_load_errors():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 48))
    sd = layer.state_dict()
    bad = dict(sd)
    del bad["weight.absmax"]
    with pytest.raises(RuntimeError, match="missing key `weight.absmax`"):
        layer.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"bias": sd["bias"]})
    small = NF4Linear.from_linear(torch.nn.Linear(32, 48)).state_dict()
    with pytest.raises(RuntimeError, match="expected shape \\[48, 64\\]"):
        layer.load_state_dict(small)


def _sd(**over):
    sd = nf4.quantize(torch.randn(16, 64), 64).to_bnb_state_dict("m.")
    sd.update(over)
    return sd


def _blob(d):
    import json
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


def test_from_bnb_state_dict_errors():
    good = _sd()
    key = "m.weight.quant_state.bitsandbytes__nf4"
    for missing in ("m.weight", "m.weight.absmax", "m.weight.quant_map", "m.weight.nested_absmax",
                    "m.weight.nested_quant_map", key):
        sd = dict(good)
        del sd[missing]
        with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
            nf4.NF4Weight.from_bnb_state_dict(sd, "m.")
    base = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [16, 64], "nested_blocksize": 256,
            "nested_dtype": "float32", "nested_offset": 0.1}
    cases = [
        ({key: torch.tensor([1, 2, 255], dtype=torch.uint8)}, ValueError, "JSON"),
        ({key: _blob({**base, "quant_type": "fp4"})}, ValueError, "nf4"),
        ({key: _blob({**base, "shape": [16, 65]})}, ValueError, "packed.*bytes"),
        ({key: _blob({**base, "blocksize": 48})}, ValueError, "blocksize"),
        ({key: _blob({**base, "dtype": "int8"})}, ValueError, "dtype"),
        ({key: _blob({k: v for k, v in base.items() if k != "shape"})}, ValueError, "shape"),
        ({"m.weight.quant_map": torch.zeros(16)}, ValueError, "quant_map"),
        ({"m.weight.absmax": torch.zeros(16)}, TypeError, "absmax.*uint8"),
        ({"m.weight.absmax": torch.zeros(15, dtype=torch.uint8)}, ValueError, "absmax.*16 block scales"),
        ({"m.weight": torch.zeros(10, 1, dtype=torch.uint8)}, ValueError, "packed"),
    ]
    for over, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            nf4.NF4Weight.from_bnb_state_dict(_sd(**over), "m.")
    fp4 = dict(good)
    fp4["m.weight.quant_state.bitsandbytes__fp4"] = fp4.pop(key)
    with pytest.raises(ValueError, match="FP4"):
        nf4.NF4Weight.from_bnb_state_dict(fp4, "m.")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_rounding_rule_whatever_the_path(device, dtype):
    """The same frozen NF4 weight gives the same output whatever the layer kind (NF4Linear, LoRALinear over it:
    unfused and fused) and the batch size (the GEMV for <= 16 rows, dequantize + GEMM above): every path uses
    the weight decoded in float32 and rounded to the compute dtype (bitsandbytes' rule). Inputs 3 * e_k make each
    output one exact float32 product, so a path that multiplied an unrounded weight would show."""
    from lorart.nn import LoRALinear
    from lorart.ops import lora as L

    torch.manual_seed(3)
    w4 = nf4.quantize(torch.randn(40, 64, device=device), 64, double_quant=True)
    want = (3 * w4.dequantize(dtype).float()).to(dtype).t()  # row k: the output for x = 3 e_k
    X = (3 * torch.eye(64, device=device)).to(dtype)
    layer = NF4Linear(w4, compute_dtype=dtype)
    lora = LoRALinear(NF4Linear(w4, compute_dtype=dtype), r=4, alpha=8)  # B = 0: the base term only
    with torch.no_grad():
        outs = {"NF4Linear M=64": layer(X),
                "NF4Linear M<=16": torch.cat([layer(X[i:i + 8]) for i in range(0, 64, 8)]),
                "NF4Linear M=1": torch.cat([layer(X[i:i + 1]) for i in range(0, 64, 9)])}
        for policy in ("never", "always"):
            old = L.set_fused_policy(policy)
            try:
                outs[f"LoRALinear {policy} M=64"] = lora(X)
                outs[f"LoRALinear {policy} M<=16"] = torch.cat([lora(X[i:i + 16]) for i in range(0, 64, 16)])
            finally:
                L.set_fused_policy(old)
    for name, y in outs.items():
        ref = want[::9] if name.endswith("M=1") else want
        assert y.dtype == dtype and torch.equal(y, ref), name
