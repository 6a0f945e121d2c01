"""Parsing of the Hugging Face / bitsandbytes 4-bit state-dict keys into an NF4Weight."""
from __future__ import annotations

import json

import torch

_NAMES_TO_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _get(sd: dict, key: str):
    if key not in sd:
        near = sorted(k for k in sd if k.startswith(key.rsplit(".", 1)[0]))[:8]
        raise KeyError(f"lorart: bnb 4-bit state dict: missing key `{key}` (keys with that prefix: {near})")
    return sd[key]


def _tensor(sd: dict, key: str, dtype: torch.dtype) -> torch.Tensor:
    t = _get(sd, key)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lorart: bnb 4-bit state dict: `{key}` must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"lorart: bnb 4-bit state dict: `{key}` must be {dtype}, got {t.dtype}")
    return t


def parse_quant_state(blob: torch.Tensor, key: str) -> dict:
    try:
        d = json.loads(bytes(blob.detach().cpu().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"lorart: bnb 4-bit state dict: `{key}` is not UTF-8 JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"lorart: bnb 4-bit state dict: `{key}` must hold a JSON object, got {type(d).__name__}")
    for f in ("quant_type", "blocksize", "dtype", "shape"):
        if f not in d:
            raise ValueError(f"lorart: bnb 4-bit state dict: `{key}` lacks the field `{f}` (got {sorted(d)})")
    if d["quant_type"] != "nf4":
        raise ValueError(f"lorart: bnb 4-bit state dict: quant_type must be 'nf4', got {d['quant_type']!r}")
    if d["dtype"] not in _NAMES_TO_DTYPE:
        raise ValueError(f"lorart: bnb 4-bit state dict: dtype must be one of {sorted(_NAMES_TO_DTYPE)}, "
                         f"got {d['dtype']!r}")
    if not isinstance(d["shape"], list) or not all(isinstance(s, int) and s > 0 for s in d["shape"]):
        raise ValueError(f"lorart: bnb 4-bit state dict: shape must be a list of positive ints, got {d['shape']!r}")
    return d


def parse_bnb_state_dict(cls, sd: dict, prefix: str, device):
    from .nf4 import NF4_CODE, QUANT_STATE_SUFFIX

    p = prefix + "weight"
    qs_key = p + "." + QUANT_STATE_SUFFIX
    if qs_key not in sd and (p + ".quant_state.bitsandbytes__fp4") in sd:
        raise ValueError(f"lorart: bnb 4-bit state dict at `{prefix}`: FP4 weights are not supported (NF4 only)")
    d = parse_quant_state(_tensor(sd, qs_key, torch.uint8), qs_key)
    packed = _tensor(sd, p, torch.uint8)
    quant_map = _tensor(sd, p + ".quant_map", torch.float32)
    if quant_map.numel() != 16 or not torch.equal(quant_map.detach().cpu().reshape(-1),
                                                  torch.tensor(NF4_CODE, dtype=torch.float32)):
        raise ValueError(f"lorart: bnb 4-bit state dict: `{p}.quant_map` is not the NF4 code table")
    dq = "nested_offset" in d or (p + ".nested_absmax") in sd
    if dq:
        for f in ("nested_blocksize", "nested_offset", "nested_dtype"):
            if f not in d:
                raise ValueError(f"lorart: bnb 4-bit state dict: `{qs_key}` lacks `{f}` for double quantization")
        if d["nested_blocksize"] != 256 or d["nested_dtype"] != "float32":
            raise ValueError("lorart: bnb 4-bit state dict: expected nested_blocksize 256 and nested_dtype "
                             f"float32, got {d['nested_blocksize']!r} and {d['nested_dtype']!r}")
        absmax = _tensor(sd, p + ".absmax", torch.uint8)
        nested_absmax = _tensor(sd, p + ".nested_absmax", torch.float32)
        nested_code = _tensor(sd, p + ".nested_quant_map", torch.float32)
        offset = float(d["nested_offset"])
    else:
        absmax = _tensor(sd, p + ".absmax", torch.float32)
        nested_absmax = nested_code = None
        offset = 0.0
    dev = torch.device(device) if device is not None else packed.device
    f = lambda t: None if t is None else t.detach().to(dev).contiguous()  # noqa: E731
    return cls(f(packed), f(absmax).reshape(-1), f(nested_absmax), f(nested_code), offset, int(d["blocksize"]),
               torch.Size(d["shape"]), _NAMES_TO_DTYPE[d["dtype"]])
