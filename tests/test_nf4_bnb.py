"""Byte-exactness against bitsandbytes (when installed) and the Hugging Face bnb-4bit keys."""
from __future__ import annotations

import json

import pytest
import torch

from lorart import nf4
from nf4_reference import _reference_dequantize

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

CASES = [
    ((32, 96), 64, torch.float32),     # row length % 16 == 0 but not % 64 (bnb's CPU dequantize bug shape)
    ((7, 13), 64, torch.bfloat16),     # odd element count, partial last block
    ((100, 300), 128, torch.float16),
    ((4099,), 256, torch.float32),     # 1-d, odd, partial
    ((300, 1024), 64, torch.bfloat16),  # > 256 absmax blocks: two nested blocks
]


def _bnb_absmax(st) -> torch.Tensor:
    """bnb's decoded fp32 absmax (computed with bnb's own blockwise dequantize, which is correct on CPU)."""
    if not st.nested:
        return st.absmax
    return F.dequantize_blockwise(st.absmax, st.state2) + st.offset


def test_dynamic_map_equals_bnb():
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map(signed=True))


def test_code_table_equals_bnb():
    assert torch.equal(nf4.nf4_code(), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape,bs,dtype", CASES)
def test_packed_and_absmax_byte_identical(shape, bs, dtype):
    w = torch.randn(shape).to(dtype)
    p_bnb, st = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=False)
    q = nf4.quantize(w, bs, double_quant=False)
    assert torch.equal(q.packed, p_bnb)
    assert torch.equal(q.absmax, st.absmax)


@pytest.mark.parametrize("shape,bs,dtype", CASES)
def test_double_quant_matches_bnb(shape, bs, dtype):
    w = torch.randn(shape).to(dtype)
    p_bnb, st = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
    q = nf4.quantize(w, bs, double_quant=True)
    assert torch.equal(q.packed, p_bnb)
    assert q.offset == st.offset.item()
    assert torch.equal(q.nested_absmax, st.state2.absmax)
    assert torch.equal(q.nested_code, st.state2.code)
    # bnb's CPU 8-bit quantizer uses a lookup table; we round to the exact nearest code:
    # they may differ by one code on rare values.
    diff = (q.absmax.int() - st.absmax.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


@pytest.mark.parametrize("shape,bs,dtype", CASES)
def test_dequantize_equals_bnb_formula(shape, bs, dtype):
    """Our dequantize == bnb's stored state decoded by the spec formula (bnb's own CPU
    dequantize_4bit is wrong for the (32, 96) shape; see nf4-format.md)."""
    w = torch.randn(shape).to(dtype)
    p_bnb, st = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
    theirs = nf4.NF4Weight(p_bnb, st.absmax, st.state2.absmax, st.state2.code, st.offset.item(), bs, shape, dtype)
    ref = _reference_dequantize(p_bnb, _bnb_absmax(st), None, None, 0.0, bs, shape, dtype)
    assert torch.equal(theirs.dequantize(), ref)


def test_state_dict_keys_and_json_match_bnb_linear4bit():
    lin = torch.nn.Linear(96, 32, bias=False)
    ref = bnb.nn.Linear4bit(96, 32, bias=False, quant_type="nf4", compress_statistics=True)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # quantizes
    ref_sd = ref.state_dict()
    ours = nf4.quantize(lin.weight.detach(), 64).to_bnb_state_dict("")
    assert list(ours) == list(ref_sd)
    for k in ours:
        assert ours[k].dtype == ref_sd[k].dtype and ours[k].shape == ref_sd[k].shape, k
    assert torch.equal(ours["weight"], ref_sd["weight"])
    j = lambda sd: json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))  # noqa: E731
    assert j(ours) == j(ref_sd)
    assert bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()) == bytes(
        ref_sd["weight.quant_state.bitsandbytes__nf4"].tolist())


@pytest.mark.parametrize("dq", [True, False])
def test_round_trip_through_hf_keys(dq):
    w = torch.randn(24, 72, dtype=torch.bfloat16)  # 72 % 16 != 0: clear of bnb's CPU dequantize bug
    q = nf4.quantize(w, 64, double_quant=dq)
    sd = q.to_bnb_state_dict("model.layers.0.mlp.up_proj.")
    # ours -> bnb: QuantState.from_dict, then bnb's own dequantize_4bit
    p = "model.layers.0.mlp.up_proj.weight"
    qs = {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
    st = F.QuantState.from_dict(qs, device=torch.device("cpu"))
    assert st.shape == w.shape and st.dtype == torch.bfloat16 and st.blocksize == 64 and st.nested == dq
    assert torch.equal(F.dequantize_4bit(sd[p], st), q.dequantize())
    # ours -> ours
    back = nf4.NF4Weight.from_bnb_state_dict(sd, "model.layers.0.mlp.up_proj.")
    assert torch.equal(back.dequantize(), q.dequantize()) and back.shape == q.shape and back.dtype == q.dtype
    # bnb -> ours: Params4bit.from_prequantized (what transformers does) then its state dict
    par = bnb.nn.Params4bit.from_prequantized(sd[p], qs, device="cpu")
    lin = bnb.nn.Linear4bit(80, 24, bias=False, quant_type="nf4", compress_statistics=dq)
    lin.weight = par
    lin.quant_state = par.quant_state
    back2 = nf4.NF4Weight.from_bnb_state_dict(lin.state_dict(), "")
    assert torch.equal(back2.dequantize(), q.dequantize())
    x = torch.randn(3, 72, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x), x @ q.dequantize().T)


def test_bnb_quantized_linear_loads_into_nf4linear():
    from lorart.nn import NF4Linear

    lin = torch.nn.Linear(64, 48)
    ref = bnb.nn.Linear4bit(64, 48, bias=True, quant_type="nf4", compress_statistics=True)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")
    ours = NF4Linear.from_linear(torch.nn.Linear(64, 48))
    ours.load_state_dict(ref.state_dict())
    st = ref.weight.quant_state
    want = _reference_dequantize(ref.weight.data, _bnb_absmax(st), None, None, 0.0, 64, (48, 64), torch.float32)
    assert torch.equal(ours.weight.dequantize(), want)
    assert torch.equal(ours.bias, lin.bias)
