"""Our prompt / prefix artifacts in PEFT 0.21's format: PEFT loads them onto the same tiny transformers Llama and
gives the same logits; PEFT-written prompt folders load into lorart."""
import pytest
import torch

import lorart.methods as M
from lorart.models import LlamaConfig, LlamaForCausalLM, save_hf_folder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)


def _pair(tmp_path):
    torch.manual_seed(0)
    ours = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    save_hf_folder(ours, str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    return ours, hf.float().eval()


def _perturb(method):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_peft_loads_our_artifact_with_the_same_logits(name, tmp_path):
    ours, hf = _pair(tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    meth = M.prepare(ours, name, num_virtual_tokens=5)
    _perturb(meth)
    d = meth.save(tmp_path / name)
    pm = peft.PeftModel.from_pretrained(hf, d).eval()
    assert pm.peft_config["default"].peft_type == ("PROMPT_TUNING" if name == "prompt" else "PREFIX_TUNING")
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    if name == "prompt":
        want = want[:, 5:]          # PEFT returns the virtual positions too
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_peft_written_prompt_tuning_loads_into_lorart(tmp_path):
    ours, hf = _pair(tmp_path)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_()
    pm.save_pretrained(str(tmp_path / "peft_prompt"))
    meth = M.load(ours, str(tmp_path / "peft_prompt"))
    assert isinstance(meth, M.PromptMethod) and meth.num_virtual_tokens == 4
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(input_ids=ids).logits[:, 4:], atol=1e-4, rtol=1e-4)
