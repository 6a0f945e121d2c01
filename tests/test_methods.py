"""lorart.methods on tiny random Llama models: identity at init, gradients, save/load, training, cache, errors."""
import pytest
import torch

import lorart.methods as M
from lorart.models import LlamaConfig, LlamaForCausalLM, generate, left_pad

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True)
IDENTITY = ["full", "lora", "adapter", "bitfit"]          # defined to start as the base model
ALL = list(M.METHODS)


def _model(seed=0):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "proj" in n:
                p.mul_(5)
    return m


def _perturb(method):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def _ids(B=2, T=9, seed=3):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", IDENTITY)
def test_identity_at_init(name):
    m = _model()
    ids = _ids()
    ref = m(ids).logits
    M.prepare(m, name)
    assert torch.equal(m(ids).logits, ref)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_virtual_tokens_from_text_equal_the_text_as_context(name):
    # a prompt initialised from tokens t, and a prefix initialised from their keys/values, both act exactly
    # like the base model reading t before the input (PEFT's position convention: the input starts at P)
    m = _model()
    ids, t = _ids(), [5, 9, 17, 33]
    ref = m(torch.cat([torch.tensor(t).expand(2, -1), ids], 1)).logits[:, len(t):]
    M.prepare(m, name, num_virtual_tokens=len(t), init_token_ids=t)
    torch.testing.assert_close(m(ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_only_intended_parameters_get_gradients(name):
    m = _model()
    meth = M.prepare(m, name)
    m.train()
    ids = _ids()
    m(ids, labels=ids).loss.backward()
    mine = {id(p) for p in meth.trainable_parameters()}
    assert mine and all(p.requires_grad for p in meth.trainable_parameters())
    for n, p in m.named_parameters():
        if id(p) in mine:
            assert p.grad is not None, n
        else:
            assert p.grad is None and not p.requires_grad, n
    assert sum(float(p.grad.abs().sum()) for p in meth.trainable_parameters()) > 0


def test_trainable_counts_match_the_formulas():
    h, L, kv, inter = 32, 2, 16, 48
    assert M.prepare(_model(), "adapter", bottleneck=4).report()["trainable_params"] == L * 2 * (h * 4 + 4 + 4 * h + h)
    assert M.prepare(_model(), "prompt", num_virtual_tokens=7).report()["trainable_params"] == 7 * h
    assert M.prepare(_model(), "prefix", num_virtual_tokens=3).report()["trainable_params"] == 3 * L * 2 * kv
    r = M.prepare(_model(), "bitfit").report()
    assert r["trainable_params"] == L * (h + kv + kv + h + inter + inter + h) and r["added_biases"] == 14
    assert M.prepare(_model(), "lora", r=2).report()["trainable_params"] == L * 2 * ((h + h) + (h + kv) + (h + kv) + (h + h))


def test_adapter_matches_a_reference_forward():
    m = _model()
    meth = M.prepare(m, "adapter", bottleneck=4, activation="relu")
    _perturb(meth)
    ids = _ids()
    x = m.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None].expand(2, -1)
    cos, sin = m.model.rotary_emb(pos, x.dtype)

    def ad(a, h):
        return h + a.up(torch.relu(a.down(h)))
    for layer in m.model.layers:
        x = x + ad(layer.self_attn.adapter, layer.self_attn.forward(layer.input_layernorm(x), cos, sin, None))
        x = x + ad(layer.mlp.adapter, layer.mlp.forward(layer.post_attention_layernorm(x)))
    torch.testing.assert_close(m(ids).logits, m.lm_head(m.model.norm(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name, tmp_path):
    m = _model()
    meth = M.prepare(m, name)
    _perturb(meth)
    ids = _ids()
    want = m(ids).logits
    d = meth.save(tmp_path / name)
    assert M.storage_bytes(d) > 0
    m2 = _model()
    loaded = M.load(m2, d)
    assert type(loaded) is type(meth)
    assert torch.equal(m2(ids).logits, want)
    if name not in ("full",):   # only what was trained is stored
        n_saved = sum(t.numel() for t in loaded.state_dict().values())
        assert n_saved < 0.5 * loaded.base_params


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_cached_generation_equals_uncached(name):
    m = _model()
    meth = M.prepare(m, name, num_virtual_tokens=3)
    _perturb(meth)
    ids, mask = left_pad([[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]], 0)
    a = generate(m, ids, max_new_tokens=6, attention_mask=mask, use_cache=True)
    b = generate(m, ids, max_new_tokens=6, attention_mask=mask, use_cache=False)
    assert torch.equal(a, b)
    # each row of the padded batch equals that prompt alone
    one = generate(m, torch.tensor([[8, 9]]), max_new_tokens=6)
    assert torch.equal(a[1, -8:], one[0])


def test_prompt_labels_and_packed_masks():
    m = _model()
    M.prepare(m, "prompt", num_virtual_tokens=4)
    ids = _ids(1, 10)
    labels = ids.clone()
    labels[:, 0] = -100   # (as in PEFT, a first label would be predicted from the last virtual token)
    out = m(ids, labels=labels)
    assert out.logits.shape == (1, 10, CFG["vocab_size"])
    # the loss covers the caller's labels only (virtual tokens are -100)
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, want)
    # a packed batch of two documents equals each document alone
    mask = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    mask[0, 0, :6, :6] = torch.ones(6, 6).tril().bool()
    mask[0, 0, 6:, 6:] = torch.ones(4, 4).tril().bool()
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    packed = m(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(packed[:, 6:], m(ids[:, 6:]).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, :6], m(ids[:, :6]).logits, atol=1e-5, rtol=1e-5)


def test_remove_restores_the_base_model():
    for name in ["lora", "adapter", "prefix", "prompt", "bitfit"]:
        m = _model()
        ids = _ids()
        ref = m(ids).logits
        meth = M.prepare(m, name)
        _perturb(meth)
        meth.remove()
        assert torch.equal(m(ids).logits, ref), name


def test_lora_merge_equals_unmerged():
    m = _model()
    meth = M.prepare(m, "lora")
    _perturb(meth)
    ids = _ids()
    want = m(ids).logits
    assert meth.merge()
    torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(M.MethodError, match="num_virtual_tokens.*>= 1, got 0"):
        M.prepare(_model(), "prefix", num_virtual_tokens=0)
    with pytest.raises(M.MethodError, match="bottleneck.*hidden_size=32.*got 64"):
        M.prepare(_model(), "adapter", bottleneck=64)
    with pytest.raises(M.MethodError, match="targets.*matched no nn.Linear"):
        M.prepare(_model(), "bitfit", targets=("no_such_layer",))
    with pytest.raises(M.MethodError, match="matched no nn.Linear"):
        M.prepare(torch.nn.Sequential(torch.nn.ReLU()), "bitfit")
    with pytest.raises(M.MethodError, match="argument `method`: expected one of full, lora.*got 'dora'"):
        M.prepare(_model(), "dora")
    with pytest.raises(M.MethodError, match="unknown option `rank`"):
        M.prepare(_model(), "lora", rank=4)
    with pytest.raises(M.MethodError, match="init_text` needs the `tokenizer`"):
        M.prepare(_model(), "prompt", init_text="hello")
    with pytest.raises(ValueError, match="bottleneck"):
        from lorart.nn import BottleneckAdapter
        BottleneckAdapter(16, 17)


def test_load_rejects_wrong_artifacts(tmp_path):
    m = _model()
    d = M.prepare(m, "prompt", num_virtual_tokens=3).save(tmp_path / "p")
    bigger = LlamaForCausalLM(LlamaConfig(**{**CFG, "hidden_size": 64}))
    with pytest.raises(M.MethodError, match="trained on a model with .*=.*, this model has"):
        M.load(bigger, d)
    with pytest.raises(M.MethodError, match="neither"):
        M.load(_model(), tmp_path)
