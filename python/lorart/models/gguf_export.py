"""Write a Llama-family model (lorart's LlamaForCausalLM, plain linears) as a GGUF file with the `gguf`
package's writer: the metadata and tensor names llama.cpp uses, what `lorart.models.load_gguf` and transformers'
GGUF loader read back.

- Tensor types: 2-d weights in F16, Q8_0 (rows whose length is not a multiple of 32 stay F16) or F32; norms and
  biases in F32 (as llama.cpp's converter does).
- llama: the rows of q_proj / k_proj are permuted as llama.cpp's converter does (rotate-half -> interleaved
  pairs; `gguf_import.permute_qk`); qwen2 keeps HF's row order.
- Tokenizer: byte-level BPE only (`tokenizer.ggml.model` "gpt2"), pre-tokenizer "smollm" (digits split one by
  one) or "gpt2": the two lorart's GGUF import rebuilds exactly. Tokens are padded to the model's vocab_size.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..sysinfo import require
from .gguf_import import permute_qk

GGUF_TYPES = ("f16", "q8_0", "f32")
_ARCHS = {"llama": "llama", "qwen2": "qwen2"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)   # model.layers.N.<rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise InputError(f"lorart: export: tensor {hf_name!r} has no GGUF name (not a Llama-family weight)")


def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """`tokenizer.ggml.*` values of a byte-level BPE lorart Tokenizer (InputError for other tokenizers)."""
    j = json.loads(tok.tk.to_str())
    model = j.get("model") or {}
    pre = j.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    digits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Digits"]
    if kinds == ["ByteLevel"]:
        pre_name = "gpt2"
    elif kinds == ["Digits", "ByteLevel"] and digits[0].get("individual_digits"):
        pre_name = "smollm"
    else:
        pre_name = None
    if model.get("type") != "BPE" or pre_name is None or j.get("normalizer") is not None:
        raise InputError("lorart: export: GGUF needs a byte-level BPE tokenizer (ByteLevel pre-tokenizer, optionally "
                         "after single-digit splitting, no normalizer), the kinds lorart's GGUF import rebuilds "
                         f"exactly; this one is {model.get('type')} with pre-tokenizer {kinds}. Use --format hf")
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: 1 for i in tokens}
    for a in j.get("added_tokens") or []:
        tokens[int(a["id"])] = a["content"]
        types[int(a["id"])] = 3 if a.get("special") else 4
    n = max(vocab_size, max(tokens) + 1)
    names = [tokens.get(i, f"<|unused_{i}|>") for i in range(n)]
    kinds_out = [types.get(i, 5) for i in range(n)]   # 5: unused (embedding rows past the tokenizer)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"pre": pre_name, "tokens": names, "token_type": kinds_out, "merges": merges}


def _q8_0_ok(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[-1] % 32 == 0


def write_gguf(model, tokenizer, path: str, gguf_type: str = "f16", name: Optional[str] = None) -> str:
    """Write `model` (plain Llama-family, no adapters left) and `tokenizer` to the GGUF file `path`."""
    gguf = require("gguf", "GGUF export")

    if gguf_type not in GGUF_TYPES:
        raise InputError(f"lorart: export: argument `gguf_type`: expected one of {', '.join(GGUF_TYPES)}, got "
                         f"{gguf_type!r}")
    c = model.config
    arch = _ARCHS.get(c.model_type)
    if arch is None:
        raise InputError(f"lorart: export: GGUF export supports llama and qwen2 models, not {c.model_type!r}")
    if c.rope_scaling is not None and c.rope_scaling.get("rope_type") != "linear":
        raise InputError(f"lorart: export: rope scaling {c.rope_scaling.get('rope_type')!r} has no GGUF form lorart "
                         "reads back (rope_freqs); use --format hf")
    if c.sliding_window is not None:
        raise InputError("lorart: export: sliding-window attention is not written to GGUF; use --format hf")
    if tokenizer is None:
        raise InputError("lorart: export: GGUF needs the tokenizer (the model folder has no tokenizer.json)")
    meta = tokenizer_metadata(tokenizer, c.vocab_size)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "f32": gguf.GGMLQuantizationType.F32}[gguf_type]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name or "lorart export")
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "f32": gguf.LlamaFileType.ALL_F32}[gguf_type])
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    if c.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    w.add_token_merges(meta["merges"])
    for key, tid in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    w.add_add_bos_token(bool(tokenizer.add_bos_token))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    sd = model.state_dict()
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for hf, t in sd.items():
        t = t.detach().to("cpu", torch.float32)
        if arch == "llama" and ".self_attn.q_proj." in hf:
            t = torch.from_numpy(permute_qk(t.numpy(), c.num_attention_heads).copy())
        elif arch == "llama" and ".self_attn.k_proj." in hf:
            t = torch.from_numpy(permute_qk(t.numpy(), c.num_key_value_heads).copy())
        arr = np.ascontiguousarray(t.numpy())
        if t.dim() < 2 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(hf), arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and _q8_0_ok(t):
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(hf), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(hf), arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
