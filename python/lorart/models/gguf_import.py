"""Import llama.cpp GGUF files: metadata -> LlamaConfig, dequantized tensors -> HF names,
and the tokenizer from `tokenizer.ggml.*` metadata.

llama.cpp's converter permutes the rows of q_proj/k_proj (per head: interleaved pairs instead of
rotate-half halves) for the llama architecture. We undo that permutation so the HF rotate-half
RoPE in `lorart.models.llama` is correct; mixing the two layouts gives garbage without an error.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
import torch

from ..sysinfo import require
from .config import LlamaConfig
from .loading import LinearFactory, build_model
from .tokenizer import Tokenizer

_MISSING = object()
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight",
               "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Pre-tokenizers we can rebuild exactly (name in tokenizer.ggml.pre -> split digits one by one).
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


def gguf_name_to_hf(name: str) -> Optional[str]:
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` for q (n_head) / k (n_head_kv) rows (weights or biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF rotate-half rows -> interleaved pairs); used by tests."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    def __init__(self, path: str):
        gguf = require("gguf", "reading a GGUF file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such GGUF file")
        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default=_MISSING):
        f = self.reader.fields.get(key)
        if f is None:
            if default is _MISSING:
                raise ValueError(f"{self.path}: GGUF metadata is missing {key!r}")
            return default
        return f.contents()

    def dequantize(self, name: str) -> np.ndarray:
        import gguf
        t = self.tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))


def gguf_config(g: GGUFFile) -> LlamaConfig:
    arch = g.field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{g.path}: GGUF architecture {arch!r} is not supported (llama, qwen2)")
    if "rope_freqs.weight" in g.tensors:
        raise ValueError(f"{g.path}: GGUF rope_freqs (Llama 3.1 rope scaling) is not supported; "
                         "load the Hugging Face safetensors folder instead")
    a = lambda k, d=_MISSING: g.field(f"{arch}.{k}", d)  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    emb = g.tensors["token_embd.weight"]
    vocab = int(a("vocab_size", int(emb.shape[1])))
    scaling = None
    if a("rope.scaling.type", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    elif a("rope.scaling.type", "none") not in ("none",):
        raise ValueError(f"{g.path}: rope scaling {a('rope.scaling.type')!r} is not supported")
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=int(a("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("attention.key_length", hidden // heads)),
        max_position_embeddings=int(a("context_length", 2048)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in g.tensors,
        o_proj_bias="blk.0.attn_output.bias" in g.tensors,
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=g.field("tokenizer.ggml.bos_token_id", None),
        eos_token_id=g.field("tokenizer.ggml.eos_token_id", None),
        pad_token_id=g.field("tokenizer.ggml.padding_token_id", None),
        model_type=arch,
    )


def gguf_tokenizer(g: GGUFFile) -> Tokenizer:
    """Byte-level BPE tokenizer rebuilt from GGUF metadata with the `tokenizers` library."""
    require("tokenizers", "a GGUF file's tokenizer")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    kind = g.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{g.path}: GGUF tokenizer model {kind!r} is not supported (only byte-level "
                         "BPE 'gpt2'); load the Hugging Face folder instead")
    pre = g.field("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{g.path}: GGUF pre-tokenizer {pre!r} is not supported "
                         f"({', '.join(_PRE_TOKENIZERS)}); load the Hugging Face folder instead")
    tokens = g.field("tokenizer.ggml.tokens")
    types = g.field("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in g.field("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tk = HFTokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if _PRE_TOKENIZERS[pre] else byte_level
    tk.decoder = decoders.ByteLevel()
    # token_type: 3 = control (special), 4 = user defined
    tk.add_tokens([AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
                   for i in range(len(tokens)) if types[i] in (3, 4)])
    tok = lambda k: (tokens[int(g.field(k))] if g.field(k, None) is not None else None)  # noqa: E731
    return Tokenizer(tk, bos_token=tok("tokenizer.ggml.bos_token_id"),
                     eos_token=tok("tokenizer.ggml.eos_token_id"),
                     pad_token=tok("tokenizer.ggml.padding_token_id"),
                     chat_template=g.field("tokenizer.chat_template", None),
                     add_bos_token=bool(g.field("tokenizer.ggml.add_bos_token", False)))


def load_gguf(path: str, dtype=torch.float32, device="cpu",
              linear_factory: Optional[LinearFactory] = None):
    """Load `(model, tokenizer)` from a GGUF file, dequantizing every tensor."""
    g = GGUFFile(path)
    config = gguf_config(g)
    names = {}
    for gname in g.tensors:
        hf = gguf_name_to_hf(gname)
        if hf is None:
            raise ValueError(f"{path}: unknown GGUF tensor {gname!r}")
        names[hf] = gname
    permute = config.model_type == "llama"

    def get(hf_name):
        w = g.dequantize(names[hf_name])
        if permute and ".self_attn.q_proj." in hf_name:
            w = unpermute_qk(w, config.num_attention_heads)
        elif permute and ".self_attn.k_proj." in hf_name:
            w = unpermute_qk(w, config.num_key_value_heads)
        return torch.from_numpy(np.require(w, requirements=["C", "W"]))

    model = build_model(config, names.keys(), get, dtype=dtype, device=device,
                        linear_factory=linear_factory, source=path)
    return model, gguf_tokenizer(g)
