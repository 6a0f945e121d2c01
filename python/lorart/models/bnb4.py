"""bitsandbytes 4-bit model folders: the form in which many Llama-family QLoRA bases are published.

A folder whose `config.json` has `quantization_config` (`quant_method: bitsandbytes`, `load_in_4bit`) stores
each quantized linear at module path P as the keys `P.weight` (packed nibbles), `P.weight.absmax`,
`P.weight.quant_map`, (`P.weight.nested_absmax`, `P.weight.nested_quant_map` with double quantization) and
`P.weight.quant_state.bitsandbytes__nf4` (docs/nf4.md). lorart reads them into `NF4Linear` layers as they
are (the packed bytes and scales are kept, never dequantized to a full copy) and writes them back the same
way. NF4 with or without double quantization, any bnb blocksize and `bnb_4bit_quant_storage` uint8 (or a
wider dtype holding the same bytes) are read; FP4 and 8-bit (LLM.int8) folders are refused.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..nf4 import QUANT_STATE_SUFFIX

FP4_SUFFIX = "quant_state.bitsandbytes__fp4"
_STORAGE = {"uint8": torch.uint8, "int8": torch.int8, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float32": torch.float32}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_quantization_config(folder: str) -> Optional[dict]:
    """The folder's `quantization_config`, checked to be one lorart loads (bitsandbytes 4-bit NF4), or None."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        q = json.load(f).get("quantization_config")
    if q is None:
        return None
    where = f"{path}: quantization_config"
    if not isinstance(q, dict):
        raise ValueError(f"{where} must be an object, got {type(q).__name__}")
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{where}: quant_method {method!r} is not supported; lorart loads dense safetensors "
                         "folders and bitsandbytes 4-bit NF4 folders (quant_method 'bitsandbytes', load_in_4bit)")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ValueError(f"{where}: 8-bit (LLM.int8) bitsandbytes folders are not supported; lorart loads "
                         "4-bit NF4 folders (load_in_4bit, bnb_4bit_quant_type 'nf4') and dense folders")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise ValueError(f"{where}: neither load_in_4bit nor load_in_8bit is set")
    qt = q.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' and transformers' default is fp4
    if qt != "nf4":
        raise ValueError(f"{where}: bnb_4bit_quant_type {qt!r} is not supported; lorart reads NF4 "
                         "(quantize the dense model with bnb_4bit_quant_type='nf4', or load it dense and let "
                         "`--method qlora` quantize it)")
    storage = q.get("bnb_4bit_quant_storage", "uint8")
    if storage not in _STORAGE:
        raise ValueError(f"{where}: bnb_4bit_quant_storage {storage!r} is not supported; expected one of "
                         f"{sorted(_STORAGE)}")
    return q


def quantized_linears(keys: Iterable[str], source: str) -> dict:
    """Module path -> the checkpoint keys of its 4-bit weight, for every layer stored in 4-bit."""
    keys = list(keys)
    out = {}
    for k in keys:
        if k.endswith("." + FP4_SUFFIX):
            raise ValueError(f"{source}: {k[:-len(FP4_SUFFIX) - 8]} is stored as bitsandbytes FP4; lorart reads "
                             "NF4 only")
        if k.endswith(".weight." + QUANT_STATE_SUFFIX):
            out[k[:-len(QUANT_STATE_SUFFIX) - 8]] = set()
    for k in keys:
        mod, sep, rest = k.partition(".weight")
        if sep and mod in out and (rest == "" or rest.startswith(".")):
            out[mod].add(k)
    return out


def nf4_linear_from_keys(name: str, keys: set, get_tensor: Callable[[str], torch.Tensor],
                         linear: nn.Linear, bias: Optional[torch.Tensor], compute_dtype: torch.dtype,
                         device: torch.device, source: str) -> nn.Module:
    """The NF4Linear stored under `name` (its packed bytes and scales as they are in the file)."""
    from ..nf4 import NF4Weight
    from ..nn.nf4_linear import NF4Linear
    sd = {k: get_tensor(k) for k in keys}
    packed = sd[name + ".weight"]
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage wider than uint8: the same bytes
        if packed.dtype not in _STORAGE.values():
            raise ValueError(f"{source}: {name}.weight: 4-bit storage dtype {packed.dtype} is not supported")
        sd[name + ".weight"] = packed.contiguous().view(torch.uint8).reshape(-1, 1)
    try:
        w = NF4Weight.from_bnb_state_dict(sd, name + ".", device=device)
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ValueError(f"{source}: {name}.weight is not a valid bitsandbytes 4-bit weight: {msg}") from None
    expected = (linear.out_features, linear.in_features)
    if tuple(w.shape) != expected:
        raise ValueError(f"{source}: {name}.weight holds a 4-bit weight of shape {list(w.shape)}, the model "
                         f"expects {list(expected)}")
    unexpected = sorted(keys - set(w.to_bnb_state_dict(name + ".")))
    if unexpected:
        raise ValueError(f"{source}: {name}: unexpected 4-bit keys {unexpected}")
    return NF4Linear(w, bias, compute_dtype=compute_dtype)


def quantization_config(model: nn.Module, dtype: torch.dtype) -> Optional[dict]:
    """The `quantization_config` transformers needs to load `model`'s NF4 layers, or None when it has none.
    Dense decoder linears (a partly quantized model) are listed in `llm_int8_skip_modules`."""
    from ..nn.nf4_linear import NF4Linear
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not nf4:
        return None
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in nf4)
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": all(m.weight.double_quant for m in nf4.values()),
            "bnb_4bit_compute_dtype": _DTYPE_NAMES.get(dtype, "float32"), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": dense or None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def quantized_keys(model: nn.Module) -> set:
    """The state-dict keys of `model`'s NF4 layers (their dtypes are part of the format: never cast)."""
    from ..nn.nf4_linear import NF4Linear
    prefixes = tuple(n + ".weight" for n, m in model.named_modules() if isinstance(m, NF4Linear))
    return {k for k in model.state_dict() if k.startswith(prefixes)} if prefixes else set()
