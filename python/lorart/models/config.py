"""Configuration of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM).

`LlamaConfig.from_hf_dict` reads a Hugging Face `config.json` dict, in both the
transformers 4 layout (`rope_theta` + `rope_scaling`) and the transformers 5 layout
(`rope_parameters`). `to_hf_dict` writes a dict that transformers loads back.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import FileFormatError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_FINITE = ("rms_norm_eps", "rope_theta")
_BOOLS = ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window")


def _check_types(d: dict) -> None:
    """The keys lorart uses have their JSON types (a bool is a bool, sizes are positive integers)."""
    def bad(k, what):
        raise ValueError(f"key `{k}`: expected {what}, got {d[k]!r} ({type(d[k]).__name__})")
    for k in _POSITIVE_INTS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            bad(k, "an integer >= 1")
    for k in _FINITE:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            bad(k, "a finite number > 0")
    for k in _BOOLS:
        if d.get(k) is not None and not isinstance(d[k], bool):
            bad(k, "true or false")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = d.get(k)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            bad(k, "a token id (an integer >= 0), a list of them, or null")
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], dict):
        bad("rope_scaling", "an object or null")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    attention_bias: bool = False  # bias on q, k, v (and o for llama; Qwen2 has none on o)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    sliding_layers: Optional[list] = None  # per-layer bool; None = all layers when sliding_window set
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # int or list of ints
    pad_token_id: Optional[int] = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # unknown HF keys, kept for round trips

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: only silu (SwiGLU) is supported")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rt not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported rope_type {rt!r}; supported: {SUPPORTED_ROPE_TYPES}")
            self.rope_scaling = {**self.rope_scaling, "rope_type": rt}
            if rt == "default":
                self.rope_scaling = None

    # ------------------------------------------------------------------ HF dicts
    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        d = dict(d)
        if "text_config" in d and "hidden_size" not in d:
            raise ValueError("multimodal configs (with text_config) are not supported")
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {SUPPORTED_MODEL_TYPES}")
        for req in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if req not in d:
                raise ValueError(f"config.json is missing required key {req!r}")
        _check_types(d)
        rope_theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")
        if isinstance(params, dict):  # transformers >= 5
            params = dict(params)
            rope_theta = params.pop("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = params
        bias = bool(d.get("attention_bias", False))
        o_bias = bias
        if mt == "qwen2":
            bias, o_bias = True, False
        sliding_window = d.get("sliding_window")
        sliding_layers = None
        if mt == "qwen2":
            lt = d.get("layer_types")
            if lt is not None:
                sliding_layers = [t == "sliding_attention" for t in lt]
            elif d.get("use_sliding_window"):
                mwl = d.get("max_window_layers", 0)
                sliding_layers = [i >= mwl for i in range(d["num_hidden_layers"])]
            else:
                sliding_layers = [False] * d["num_hidden_layers"]
            if not any(sliding_layers):
                sliding_window, sliding_layers = None, None
        elif mt == "llama":
            sliding_window = None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
        kwargs.update(rope_theta=float(rope_theta), rope_scaling=scaling, attention_bias=bias,
                      o_proj_bias=o_bias, sliding_window=sliding_window, sliding_layers=sliding_layers,
                      model_type=mt)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs[k] = d.get(k)
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known and k not in (
            "rope_parameters", "layer_types", "use_sliding_window", "max_window_layers",
            "transformers_version", "torch_dtype", "dtype", "architectures",
            "quantization_config")}  # the weights' storage form: read and written by models/bnb4.py
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str) -> "LlamaConfig":
        from ..fileformats import read_json

        d = read_json(path)
        try:
            return cls.from_hf_dict(d)
        except (ValueError, TypeError) as e:
            raise FileFormatError(f"lorart: {path}: {e}") from None

    def to_hf_dict(self, dtype: Optional[torch.dtype] = None) -> dict:
        d = dict(self.extra)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        d.update(
            architectures=[arch[self.model_type]], model_type=self.model_type,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        elif self.model_type == "qwen2":
            sl = self.sliding_layers or [False] * self.num_hidden_layers
            d.update(sliding_window=self.sliding_window, use_sliding_window=any(sl),
                     layer_types=["sliding_attention" if s else "full_attention" for s in sl])
        if dtype is not None:
            d["torch_dtype"] = str(dtype).replace("torch.", "")
        return d

    def eos_ids(self) -> list:
        e = self.eos_token_id
        return [] if e is None else ([int(x) for x in e] if isinstance(e, (list, tuple)) else [int(e)])

    def is_sliding(self, layer_idx: int) -> bool:
        if self.sliding_window is None:
            return False
        return True if self.sliding_layers is None else bool(self.sliding_layers[layer_idx])

    # ------------------------------------------------------------------ RoPE
    def rope_inv_freq(self, device=None) -> torch.Tensor:
        """Inverse frequencies [head_dim/2] in fp32, with llama3/linear scaling applied."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device)
                                         .float() / dim))
        rs = self.rope_scaling
        if rs is None:
            return inv
        if rs["rope_type"] == "linear":
            return inv / float(rs["factor"])
        # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled)

