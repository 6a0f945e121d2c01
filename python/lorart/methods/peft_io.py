"""PEFT's prompt-learning artifacts (checked against peft 0.21.2's peft_model.py / utils/other.py).

- PROMPT_TUNING: `adapter_model.safetensors` with `prompt_embeddings` [num_virtual_tokens, hidden_size].
- PREFIX_TUNING (prefix_projection=False): `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * kv_dim] with
  kv_dim = num_key_value_heads * head_dim (PEFT's GQA rule). PEFT views it as [B, P, 2L, n_kv, head_dim] and
  permutes to [2L, B, n_kv, P, head_dim]: index 2l is layer l's keys, 2l + 1 its values. The keys are used
  as cached keys (no RoPE applied to them) and the real tokens' positions start at P.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..fileformats import Fields
from .base import MethodError, expect_tensor, read_json, read_safetensors

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def prompt_learning_config(model: nn.Module, peft_type: str, num_virtual_tokens: int, base_model_name=None) -> dict:
    c = model.config
    token_dim = c.hidden_size if peft_type == "PROMPT_TUNING" else c.num_key_value_heads * c.head_dim
    heads = c.num_attention_heads if peft_type == "PROMPT_TUNING" else c.num_key_value_heads
    cfg = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": heads,
        "num_layers": c.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(num_virtual_tokens),
        "peft_type": peft_type,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
    }
    if peft_type == "PROMPT_TUNING":
        cfg.update({"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                    "tokenizer_kwargs": None, "tokenizer_name_or_path": None})
    else:
        cfg.update({"encoder_hidden_size": token_dim, "prefix_projection": False})
    return cfg


def read_prompt_learning_config(directory: str, peft_type: str, model: nn.Module) -> dict:
    """`adapter_config.json` of a PEFT PROMPT_TUNING / PREFIX_TUNING folder, checked (types exact)."""
    path = os.path.join(directory, PEFT_CONFIG)
    cfg = read_json(path)
    f = Fields(cfg, path, error=MethodError)
    f.str("peft_type", choices=(peft_type,))
    f.int("num_virtual_tokens", min=1)
    if f.int("num_transformer_submodules", 1, min=1) != 1:
        f.fail("num_transformer_submodules", "1 (decoder-only)", cfg["num_transformer_submodules"])
    layers = model.config.num_hidden_layers
    if f.int("num_layers", layers, min=1) != layers:
        raise MethodError(f"lorart: {path}: key `num_layers`: the model has {layers} layers, the file "
                          f"{cfg['num_layers']}")
    for key in ("prefix_projection", "inference_mode"):
        f.bool(key, None)
    for key in ("token_dim", "num_attention_heads", "encoder_hidden_size"):
        f.int(key, None, min=1)
    return cfg


def read_prompt_embeddings(directory: str, cfg: dict, width: int) -> torch.Tensor:
    """The one tensor of a prompt-learning folder, `prompt_embeddings` [num_virtual_tokens, width] (float, finite;
    no other key)."""
    path = os.path.join(directory, PEFT_WEIGHTS)
    tensors = read_safetensors(path)
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise MethodError(f"lorart: {path}: key `{extra[0]}`: unexpected (a {cfg['peft_type']} folder holds only "
                          "`prompt_embeddings`)")
    return expect_tensor(tensors, "prompt_embeddings", (cfg["num_virtual_tokens"], width), path)


def prefix_to_layers(flat: torch.Tensor, num_layers: int, n_kv: int, head_dim: int) -> list:
    """[P, L*2*n_kv*hd] (PEFT layout) -> per layer (k, v), each [1, n_kv, P, hd]."""
    P = flat.shape[0]
    x = flat.view(P, num_layers * 2, n_kv, head_dim).permute(1, 2, 0, 3)   # [2L, n_kv, P, hd]
    return [(x[2 * i].unsqueeze(0), x[2 * i + 1].unsqueeze(0)) for i in range(num_layers)]


def layers_to_prefix(kvs: list) -> torch.Tensor:
    """Inverse of prefix_to_layers: per layer (k, v) [1, n_kv, P, hd] -> [P, L*2*n_kv*hd]."""
    x = torch.stack([t[0] for kv in kvs for t in kv])                     # [2L, n_kv, P, hd]
    P = x.shape[2]
    return x.permute(2, 0, 1, 3).reshape(P, -1)
