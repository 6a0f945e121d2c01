"""CUDA checks (skipped without a GPU): parity, bf16 error bound, loading to cuda, generation."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from lorart.models import LlamaConfig, LlamaForCausalLM, generate, left_pad, load_hf_folder  # noqa: E402

KW = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
          num_attention_heads=8, num_key_value_heads=2, rope_scaling={
              "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}, rope_theta=500000.0)


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**KW)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_hf_dict(cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    return hf.to("cuda", dtype), ours.to("cuda", dtype)


def test_cuda_fp32_parity_and_bf16_error_bound():
    hf, ours = _pair()
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert (ours(ids).logits - ref).abs().max().item() < 1e-4
        padded = ours(ids, attention_mask=mask).logits[1, :50]
        assert (padded - hf(input_ids=ids[1:, :50]).logits[0]).abs().max().item() < 1e-4
        hf16, ours16 = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
        err_hf = (hf16(input_ids=ids).logits.float() - ref).abs().max().item()
        err_ours = (ours16(ids).logits.float() - ref).abs().max().item()
    assert err_ours <= 2 * err_hf + 1e-3


def test_cuda_load_and_generate(tmp_path):
    hf, _ = _pair()
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_folder(str(tmp_path), dtype=torch.bfloat16, device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
    model = model.float()
    prompts = [[5, 9, 3, 7, 1, 22, 40, 8], [11, 4], [60, 61, 62, 63, 2]]
    ids, mask = left_pad(prompts, pad_id=0)
    ids, mask = ids.cuda(), mask.cuda()
    a = generate(model, ids, max_new_tokens=10, attention_mask=mask)
    b = generate(model, ids, max_new_tokens=10, attention_mask=mask, use_cache=False)
    assert torch.equal(a, b)
    for i, p in enumerate(prompts):
        single = generate(model, torch.tensor([p], device="cuda"), max_new_tokens=10)
        assert a[i, ids.shape[1]:].tolist() == single[0, len(p):].tolist()


def test_cuda_gradient_checkpointing_bf16_autocast():
    _, ours = _pair()
    ours.train().gradient_checkpointing_enable()
    ids = torch.randint(0, 128, (4, 96), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ours(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(ours.model.layers[0].self_attn.q_proj.weight.grad).all()
