"""PEFT-format adapter files: round trip, interop with peft (both ways), bad files."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file, load_file

import lorart
from lorart.adapters import AdapterFileError, CONFIG_NAME, WEIGHTS_NAME
from lorart.inject import lora_layers

from test_lora_layers import randomize, tiny_llama


def trained(model, targets=("q_proj", "v_proj"), r=4, alpha=8, rslora=False):
    lorart.inject(model, list(targets), r=r, alpha=alpha, dropout=0.0, rslora=rslora)
    torch.manual_seed(5)
    for m in lora_layers(model).values():
        randomize(m)
    return model


def test_save_writes_peft_layout_atomically(tmp_path):
    model = trained(tiny_llama())
    d = tmp_path / "ad"
    os.makedirs(d)
    (d / "stale.txt").write_text("old")  # an existing folder is replaced as a whole
    lorart.save_adapter(model, str(d))
    assert sorted(os.listdir(d)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".lorart")] == []
    cfg = json.loads((d / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["use_rslora"] is False
    sd = load_file(str(d / WEIGHTS_NAME))
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert k in sd and sd[k].shape == (4, 32)
    assert sd[k.replace("lora_A", "lora_B")].shape == (32, 4) and len(sd) == 8


def test_roundtrip_same_logits(tmp_path):
    model = trained(tiny_llama(), rslora=True)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    lorart.save_adapter(model, str(tmp_path / "a"))
    fresh = tiny_llama()  # same seed: same base weights
    paths = lorart.load_adapter(fresh, str(tmp_path / "a"), name="mine")
    assert len(paths) == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref)


def test_lorart_to_peft_and_back_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = trained(tiny_llama())
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        ours = model(ids).logits
    lorart.save_adapter(model, str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = pm(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # PEFT -> lorart: an adapter trained (randomised) and saved by PEFT
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], lora_dropout=0.0,
                          rank_pattern={"gate_proj": 4}, alpha_pattern={"o_proj": 4})
    pm2 = peft.get_peft_model(tiny_llama(), cfg).eval()
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        ref = pm2(ids).logits
    pm2.save_pretrained(str(tmp_path / "peft"))
    base = tiny_llama()
    lorart.load_adapter(base, str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, ref, rtol=1e-5, atol=1e-5)


def _write(d, sd, cfg):
    os.makedirs(d, exist_ok=True)
    save_file(sd, os.path.join(d, WEIGHTS_NAME))
    with open(os.path.join(d, CONFIG_NAME), "w") as f:
        json.dump(cfg, f)


def test_bad_files_name_the_file_and_key(tmp_path):
    model = trained(tiny_llama())
    good = tmp_path / "good"
    lorart.save_adapter(model, str(good))
    sd = load_file(str(good / WEIGHTS_NAME))
    cfg = json.loads((good / CONFIG_NAME).read_text())
    kA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    missing = dict(sd)
    del missing[kA.replace("lora_A", "lora_B")]
    _write(tmp_path / "missing", missing, cfg)
    with pytest.raises(AdapterFileError, match=r"missing.*q_proj\.lora_B\.weight.*is missing"):
        lorart.load_adapter(tiny_llama(), str(tmp_path / "missing"))

    shape = dict(sd)
    shape[kA] = torch.zeros(4, 31)
    _write(tmp_path / "shape", shape, cfg)
    with pytest.raises(AdapterFileError, match=r"shape.*q_proj\.lora_A\.weight.*expected shape \[r, 32\]"):
        lorart.load_adapter(tiny_llama(), str(tmp_path / "shape"))

    unknown = dict(sd)
    unknown["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    unknown["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    _write(tmp_path / "unknown", unknown, cfg)
    with pytest.raises(AdapterFileError, match=r"layers\.9\.self_attn\.q_proj' does not exist"):
        lorart.load_adapter(tiny_llama(), str(tmp_path / "unknown"))

    trunc = tmp_path / "trunc"
    os.makedirs(trunc)
    data = (good / WEIGHTS_NAME).read_bytes()
    (trunc / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    (trunc / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=r"trunc/adapter_model\.safetensors: not a readable safetensors"):
        lorart.load_adapter(tiny_llama(), str(trunc))

    pick = tmp_path / "pickle"
    os.makedirs(pick)
    torch.save(sd, str(pick / "adapter_model.bin"))
    (pick / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="adapter_model.bin, a pickle, which lorart never loads"):
        lorart.load_adapter(tiny_llama(), str(pick))

    _write(tmp_path / "dora", sd, dict(cfg, use_dora=True))
    with pytest.raises(AdapterFileError, match="use_dora"):
        lorart.load_adapter(tiny_llama(), str(tmp_path / "dora"))
    _write(tmp_path / "targets", sd, dict(cfg, target_modules=["q_proj"]))
    with pytest.raises(AdapterFileError, match=r"target_modules.*\['v_proj'\]"):
        lorart.load_adapter(tiny_llama(), str(tmp_path / "targets"))
    extra = dict(sd, **{"base_model.model.lm_head.weight": torch.zeros(96, 32)})
    _write(tmp_path / "extra", extra, cfg)
    with pytest.raises(AdapterFileError, match=r"lm_head\.weight.*unsupported tensor"):
        lorart.load_adapter(tiny_llama(), str(tmp_path / "extra"))
    # nothing was changed by the failed loads
    m = tiny_llama()
    with pytest.raises(AdapterFileError):
        lorart.load_adapter(m, str(tmp_path / "unknown"))
    assert lora_layers(m) == {}
