"""bitsandbytes 4-bit model folders as QLoRA bases: folders written by transformers + bitsandbytes on the CPU load
with their bytes as stored and the same logits; lorart writes folders transformers + bitsandbytes load back."""
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

import lorart  # noqa: E402
from lorart.models import load_model, save_hf_folder  # noqa: E402
from lorart.nn.nf4_linear import NF4Linear  # noqa: E402

from conftest import requires_cuda  # noqa: E402
from nf4_reference import _reference_dequantize  # noqa: E402

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def _write_bnb(root, name, quant_type="nf4", double_quant=True, storage=None, intermediate=128, bias=False):
    """A tiny random Llama quantized and saved by transformers + bitsandbytes (CPU)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, attention_bias=bias, mlp_bias=bias)
    dense = os.path.join(root, f"{name}-dense")
    transformers.LlamaForCausalLM(cfg).save_pretrained(dense)
    kw = {"bnb_4bit_quant_storage": storage} if storage is not None else {}
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                         bnb_4bit_use_double_quant=double_quant,
                                         bnb_4bit_compute_dtype=torch.bfloat16, **kw)
    out = os.path.join(root, name)
    transformers.AutoModelForCausalLM.from_pretrained(dense, quantization_config=qc, device_map="cpu",
                                                      dtype=torch.float32).save_pretrained(out)
    return out


def _hf_logits(folder):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    n4 = 0
    for m in hf.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32  # the folders say bf16; compare in fp32
            n4 += 1
    with torch.no_grad():
        return hf.eval()(input_ids=IDS).logits, n4


def _file_tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bnb"))
    return {"nf4_dq": _write_bnb(root, "nf4_dq"), "nf4": _write_bnb(root, "nf4", double_quant=False, bias=True),
            "bf16_storage": _write_bnb(root, "bf16_storage", storage=torch.bfloat16),
            "fp4": _write_bnb(root, "fp4", quant_type="fp4"), "root": root}


@pytest.mark.parametrize("name", ["nf4_dq", "nf4", "bf16_storage"])
def test_loads_transformers_bnb_folder_as_stored_with_equal_logits(folders, name):
    folder = folders[name]
    model, tok = load_model(folder)
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 14 and not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules()
                                      if n.startswith("model.layers."))
    file = _file_tensors(folder)
    for n, m in nf4.items():  # the stored bytes and scales, not a re-quantization
        w = m.weight
        assert torch.equal(w.packed, file[n + ".weight"].view(torch.uint8).reshape(-1, 1))
        assert torch.equal(w.absmax, file[n + ".weight.absmax"])
        assert w.double_quant == (name != "nf4")
    ref, n4 = _hf_logits(folder)
    assert n4 == 14
    with torch.no_grad():
        out = model(IDS).logits
    assert (out - ref).abs().max().item() <= 1e-5
    # compute in bf16 (as on CUDA): within bf16 rounding of the fp32 result
    m16, _ = load_model(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        assert (m16(IDS).logits.float() - ref).abs().max().item() <= 0.05


def test_bnb_cpu_dequantize_bug_shape_reads_by_the_spec(tmp_path):
    """Rows of 96 at blocksize 64: bitsandbytes' own CPU dequantize is wrong here (nf4-format.md); lorart must
    equal a dense model built from the stored bytes decoded by the spec formula."""
    folder = _write_bnb(str(tmp_path), "odd", intermediate=96)
    model, _ = load_model(folder)
    dense, _ = load_model(folder)  # then replace every NF4Linear by the spec decode of the file
    file = _file_tensors(folder)
    for n, m in list(dense.named_modules()):
        if isinstance(m, NF4Linear):
            w = m.weight
            qs = json.loads(bytes(file[n + ".weight.quant_state.bitsandbytes__nf4"].tolist()))
            wd = _reference_dequantize(w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize,
                                       tuple(qs["shape"]), torch.float32)
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = wd
            parent, _, child = n.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    with torch.no_grad():
        assert (model(IDS).logits - dense(IDS).logits).abs().max().item() <= 1e-5


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["quantization_config"].update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return dst


def test_unsupported_quantized_folders_are_refused_clearly(folders, tmp_path):
    with pytest.raises(ValueError, match="bnb_4bit_quant_type 'fp4' is not supported; lorart reads NF4"):
        load_model(folders["fp4"])
    # the config says nf4 but the weights are fp4: the weights decide
    lying = _edit_config(folders["fp4"], str(tmp_path / "lying"), bnb_4bit_quant_type="nf4")
    with pytest.raises(ValueError, match=r"(self_attn|mlp)\.\w+_proj is stored as bitsandbytes FP4; lorart reads NF4"):
        load_model(lying)
    eight = _edit_config(folders["nf4_dq"], str(tmp_path / "eight"), load_in_4bit=False, _load_in_4bit=False,
                         load_in_8bit=True)
    with pytest.raises(ValueError, match=r"8-bit \(LLM\.int8\) bitsandbytes folders are not supported"):
        load_model(eight)
    gptq = _edit_config(folders["nf4_dq"], str(tmp_path / "gptq"), quant_method="gptq")
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        load_model(gptq)
    # a corrupt 4-bit weight (truncated packed bytes) names the layer
    bad = str(tmp_path / "bad")
    shutil.copytree(folders["nf4_dq"], bad)
    from safetensors.torch import save_file
    t = _file_tensors(bad)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-2]
    save_file(t, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is not a valid bitsandbytes 4-bit"):
        load_model(bad)
    with pytest.raises(ValueError, match="either `quantize` or `linear_factory`"):
        load_model(folders["nf4_dq"], quantize="nf4", linear_factory=lambda n, m: m)


@pytest.mark.parametrize("partial", [False, True])
def test_saves_a_bnb_folder_that_transformers_loads(folders, tmp_path, partial):
    dense = folders["root"] + "/nf4_dq-dense"
    if partial:  # only q/v in 4-bit: the dense linears go to llm_int8_skip_modules
        model, _ = load_model(dense, linear_factory=lambda n, lin: NF4Linear.from_linear(
            lin, compute_dtype=torch.float32) if n.endswith(("q_proj", "v_proj")) else lin)
    else:
        model, _ = load_model(dense, quantize="nf4")
    out = str(tmp_path / "out")
    save_hf_folder(model, out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True
    ref, n4 = _hf_logits(out)
    assert n4 == (4 if partial else 14)
    with torch.no_grad():
        ours = model(IDS).logits
    assert (ours - ref).abs().max().item() <= 1e-5
    again, _ = load_model(out)  # and back into lorart: the same bytes
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, ours)
    if not partial:  # lorart's nibbles of the dense folder are bitsandbytes' byte for byte; the nested 8-bit
        # absmax codes may differ by one code (bnb's CPU 8-bit quantizer uses a lookup table: nf4-format.md)
        theirs, ours_t = _file_tensors(folders["nf4_dq"]), _file_tensors(out)
        assert set(theirs) == set(ours_t)
        for k, v in theirs.items():
            if k.endswith(".weight") and v.dtype == torch.uint8:
                assert torch.equal(v, ours_t[k]), k
            if k.endswith(".absmax"):
                assert (v.int() - ours_t[k].int()).abs().max() <= 1, k
        # a dense save of the dequantized model carries no quantization_config
        merged, _ = load_model(dense)
        save_hf_folder(merged, str(tmp_path / "dense"))
        assert "quantization_config" not in json.load(open(tmp_path / "dense" / "config.json"))


def test_stored_form_is_kept_no_full_copy(folders):
    model, _ = load_model(folders["nf4_dq"])
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    n = sum(m.in_features * m.out_features for m in layers)
    assert sum(m.weight.nbytes for m in layers) == n // 2 + n // 64 + 4 * len(layers)  # 4.127 bits per weight
    tables = 4 * 256 * len(layers)  # the nested code table, held per layer
    held = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "_nf4_" in name)
    assert held == n // 2 + n // 64 + 4 * len(layers) + tables
    assert not any(p.numel() == m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)
                   for p in m.parameters())


@requires_cuda
@pytest.mark.cuda
def test_cuda_load_peak_memory_stays_4bit(folders):
    torch.cuda.reset_peak_memory_stats()
    model, _ = load_model(folders["nf4_dq"], dtype=torch.bfloat16, device="cuda")
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    dense_rest = sum(p.numel() * p.element_size() for p in model.parameters())
    assert torch.cuda.max_memory_allocated() < dense_rest + linear * 0.6 + (1 << 20)
    with torch.no_grad():
        ref, _ = _hf_logits(folders["nf4_dq"])
        assert (model(IDS.cuda()).logits.float().cpu() - ref).abs().max().item() <= 0.05


def test_train_qlora_on_a_bnb_folder_and_reload(tmp_path):
    from train_helpers import tiny_folder
    dense = tiny_folder(tmp_path / "dense")
    m, tok = load_model(dense, quantize="nf4")
    q = str(tmp_path / "q")
    save_hf_folder(m, q, tok)
    from lorart.__main__ import main
    data = tmp_path / "d.jsonl"  # ShareGPT records, as many QLoRA users have them
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Say {w}."},
                                                          {"from": "gpt", "value": f"ANSWER: {w}"}]}) + "\n"
                            for w in ("yes", "no", "maybe", "red", "blue", "green", "one", "two")))
    out = str(tmp_path / "run")
    assert main(["train", "--model", q, "--method", "qlora", "--data", str(data), "--eval-fraction", "0.25",
                 "--max-steps", "6", "--batch-size", "2", "--max-seq-len", "64", "--num-samples", "0",
                 "--no-general", "--quiet", "--output-dir", out, "--lr", "1e-2"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert [(f["format"], f["container"], f["records"]) for f in summary["data_files"]] == [("sharegpt", "jsonl", 8)]
    # the trained adapter on the 4-bit folder == on the dense folder quantized while loading (same bytes)
    outs = []
    for base in (q, dense):
        model, _ = load_model(base, quantize=None if base == q else "nf4")
        lorart.methods.load(model, os.path.join(out, "adapter"))
        with torch.no_grad():
            outs.append(model(IDS % tok.vocab_size).logits)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="method 'full': 14 linear layers of the model are stored in 4-bit"):
        lorart.train(q, None, method="full", max_steps=1, output_dir=str(tmp_path / "full"), progress=False)
