"""Model behaviour on tiny random configs: cache, padding, seams, checkpointing, errors."""
import pytest
import torch

from lorart.models import KVCache, LlamaConfig, LlamaForCausalLM, generate, left_pad

CFG = dict(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _model(**kw):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**{**CFG, **kw})).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so greedy picks are well separated
        for n, p in m.named_parameters():
            if "proj" in n:
                p.mul_(5)
    return m


def test_module_names_match_hf_layout():
    m = _model(tie_word_embeddings=False)
    names = set(dict(m.named_modules()))
    for n in ("model.embed_tokens", "model.norm", "lm_head", "model.layers.1.input_layernorm",
              "model.layers.1.post_attention_layernorm", "model.layers.0.mlp.gate_proj",
              "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        assert n in names
    for p in "qkvo":
        assert isinstance(m.get_submodule(f"model.layers.0.self_attn.{p}_proj"), torch.nn.Linear)


def test_tied_embeddings_share_storage():
    m = _model()
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_cached_generation_equals_uncached():
    m = _model()
    prompt = torch.randint(0, 80, (1, 7))
    a = generate(m, prompt, max_new_tokens=12, use_cache=True)
    b = generate(m, prompt, max_new_tokens=12, use_cache=False)
    assert a.shape == (1, 19) and torch.equal(a, b)


def test_incremental_forward_matches_full():
    m = _model(sliding_window=6, model_type="mistral")
    ids = torch.randint(0, 80, (2, 15))
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(2)
        first = m(ids[:, :9], past_key_values=cache, use_cache=True).logits
        rest = m(ids[:, 9:], past_key_values=cache, use_cache=True).logits  # T > 1 with a past
    assert cache.seq_len == 15
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_unbatched():
    m = _model()
    prompts = [[5, 9, 3, 7, 1, 22, 40, 8], [11, 4], [60, 61, 62, 63, 2]]
    ids, mask = left_pad(prompts, pad_id=0)
    batched = generate(m, ids, max_new_tokens=8, attention_mask=mask)
    for i, p in enumerate(prompts):
        single = generate(m, torch.tensor([p]), max_new_tokens=8)
        assert batched[i, ids.shape[1]:].tolist() == single[0, len(p):].tolist()


def test_generation_stops_on_eos_and_pads():
    m = _model()
    prompt = torch.randint(0, 80, (1, 5))
    free = generate(m, prompt, max_new_tokens=6)
    eos = int(free[0, 7])  # force the third new token to be EOS
    out = generate(m, prompt, max_new_tokens=6, eos_token_id=[eos, 79])
    assert out.shape[1] <= 8 and int(out[0, -1]) == eos
    sampled = generate(m, prompt, max_new_tokens=5, temperature=0.8, top_p=0.9,
                       generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 10)


def test_generate_rejects_right_padding():
    m = _model()
    with pytest.raises(ValueError, match="left padding"):
        generate(m, torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))


def test_loss_ignores_masked_labels():
    m = _model()
    ids = torch.randint(0, 80, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 6:] = -100
    out = m(ids, labels=labels)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    ref = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(out.loss, ref)
    assert m(ids, labels=torch.full_like(ids, -100)).loss.item() == 0.0


def test_inputs_embeds_equals_input_ids():
    m = _model()
    ids = torch.randint(0, 80, (2, 6))
    with torch.no_grad():
        a = m(ids).logits
        b = m(inputs_embeds=m.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        m(ids, inputs_embeds=m.get_input_embeddings()(ids))


def test_prefix_kv_seam_equals_cached_prefix():
    """Prefix keys/values of a real prefix (from a cache) reproduce the full sequence's logits."""
    m = _model()
    ids = torch.randint(0, 80, (1, 12))
    with torch.no_grad():
        full = m(ids).logits
        cache = m(ids[:, :5], use_cache=True).past_key_values
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.prefix_kv = (cache.keys[i], cache.values[i])
        pos = torch.arange(5, 12)[None]
        suffix = m(ids[:, 5:], position_ids=pos).logits
        suffix_cached = m(ids[:, 5:], position_ids=pos, use_cache=True).logits
    torch.testing.assert_close(suffix, full[:, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(suffix_cached, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_grads():
    ids = torch.randint(0, 80, (2, 9))
    grads = []
    for ckpt in (False, True):
        m = _model().train()
        if ckpt:
            m.gradient_checkpointing_enable()
        m(ids, labels=ids).loss.backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_packed_4d_mask_equals_separate_sequences():
    m = _model()
    a, b = torch.randint(0, 80, (1, 5)), torch.randint(0, 80, (1, 4))
    ids = torch.cat([a, b], 1)
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    mask[0, 0, :5, :5] = torch.ones(5, 5).tril().bool()
    mask[0, 0, 5:, 5:] = torch.ones(4, 4).tril().bool()
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        packed = m(ids, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(packed[:, :5], m(a).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 5:], m(b).logits, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    m = _model()
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.rand(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="labels"):
        m(torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(**{**CFG, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf_dict({**CFG, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf_dict({**CFG, "model_type": "gpt2"})
