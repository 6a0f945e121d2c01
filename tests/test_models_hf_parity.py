"""Our LlamaForCausalLM against transformers on tiny random configs (fp32)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lorart.models import LlamaConfig, LlamaForCausalLM, load_hf_folder  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

VARIANTS = {
    "llama": (transformers.LlamaConfig, dict(TINY)),
    "llama_mha_tied": (transformers.LlamaConfig, dict(TINY, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope": (transformers.LlamaConfig, dict(TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama_bias_headdim": (transformers.LlamaConfig, dict(TINY, attention_bias=True, mlp_bias=True,
                                                         head_dim=32)),
    "qwen2": (transformers.Qwen2Config, dict(TINY, tie_word_embeddings=True)),
    "mistral_window": (transformers.MistralConfig, dict(TINY, sliding_window=8, head_dim=16)),
}


def _hf_model(name):
    cfg_cls, kw = VARIANTS[name]
    torch.manual_seed(0)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random biases / norms so they are exercised
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.5 if "norm" in n else 0.0, 0.1)
    return model


def _ours_from(hf):
    cfg = LlamaConfig.from_hf_dict(hf.config.to_dict())
    ours = LlamaForCausalLM(cfg).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and not missing
    return ours


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name):
    hf = _hf_model(name)
    ours = _ours_from(hf)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels)
        out = ours(ids, labels=labels)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    # right-padded batch: real tokens match the unpadded logits
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask).logits
        ref_short = hf(input_ids=ids[1:, :30]).logits
    assert (padded[1, :30] - ref_short[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("sharded", [False, True])
def test_load_save_pretrained_folder(tmp_path, sharded):
    hf = _hf_model("qwen2" if sharded else "llama3_rope")
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "5GB")
    names = os.listdir(tmp_path)
    assert ("model.safetensors.index.json" in names) == sharded
    model, tok = load_hf_folder(str(tmp_path), dtype=torch.float32)
    assert tok is None  # no tokenizer files were saved
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        assert (model(ids).logits - hf(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_our_saved_folder_loads_in_transformers(tmp_path):
    from lorart.models import save_hf_folder
    hf = _hf_model("llama_mha_tied")
    ours = _ours_from(hf)
    save_hf_folder(ours, str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ours(ids).logits).abs().max().item() <= 1e-5
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["tie_word_embeddings"] is True


def test_refuses_bin_weights(tmp_path):
    hf = _hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled .*\.bin"):
        load_hf_folder(str(tmp_path))
