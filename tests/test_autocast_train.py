"""LoRA training under torch.autocast("cpu", torch.bfloat16): lorart.inject into a transformers Llama and into
lorart's own Llama against PEFT + transformers under the same autocast, from the same weights (a tiny random
Llama) and the same LoRA initialisation.

Tolerance: in bf16 every matmul output is rounded to 8 significant bits, and lorart rounds at other places than
PEFT does (the fused LoRA layer adds the base and LoRA terms in fp32 and rounds once; PEFT rounds each term, then
adds). So the rule of the op tests applies to the curves: against the fp32 curve (PEFT without autocast), lorart's
bf16 curve may be at most 2x as far as PEFT's bf16 curve is (its largest distance over the steps), plus 2e-3; and
training must make progress (the loss falls by much more than that). Measured (8 steps, lr 1e-2): PEFT bf16 within
1.6e-3 of fp32; lorart within 2.4e-3 (inject into transformers) and 2.9e-3 (lorart's Llama); the loss falls by 0.51.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lorart

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 8


def _hf():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY)
    cfg._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


def _peft(hf):
    return peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                  target_modules=TARGETS))


def _copy_lora_init(src, dst):
    """PEFT's lora_A (kaiming-uniform) into lorart's layers of the same path; B stays zero in both."""
    want = {n.split("base_model.model.", 1)[-1]: p for n, p in src.named_parameters() if "lora_A" in n}
    n = 0
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name in want:
                p.copy_(want[name])
                n += 1
    assert n == len(want) > 0


def _train(model, ids, autocast: bool, ours_llama: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids) if ours_llama else model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return torch.tensor(losses)


def test_lora_training_under_bf16_autocast_matches_peft():
    from lorart.models import LlamaConfig, LlamaForCausalLM

    hf = _hf()
    ids = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(1))
    ref32 = _peft(hf)
    ref16 = _peft(hf)
    ref16.load_state_dict(ref32.state_dict())

    hf_ours = copy.deepcopy(hf)
    lorart.inject(hf_ours, targets=TARGETS, r=8, alpha=16, dropout=0.0)
    _copy_lora_init(ref32, hf_ours)

    llama = LlamaForCausalLM(LlamaConfig.from_hf_dict(hf.config.to_dict()))
    missing, unexpected = llama.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected
    lorart.inject(llama, targets=TARGETS, r=8, alpha=16, dropout=0.0)
    _copy_lora_init(ref32, llama)

    peft32 = _train(ref32, ids, autocast=False)
    peft16 = _train(ref16, ids, autocast=True)
    ours_hf = _train(hf_ours, ids, autocast=True)
    ours_llama = _train(llama, ids, autocast=True, ours_llama=True)

    noise = (peft16 - peft32).abs().max().item()
    assert noise > 0  # autocast really ran in bf16
    for name, got in (("inject into transformers", ours_hf), ("lorart Llama", ours_llama)):
        err = (got - peft32).abs().max().item()
        assert err <= 2 * noise + 2e-3, (name, got.tolist(), peft16.tolist(), peft32.tolist())
        assert got[-1] < got[0] - 20 * (noise + 2e-3), (name, got.tolist())
