"""What a run is: digests of the base model (config and weights), the data (as tokenized) and the options that
shape the trajectory. Each checkpoint stores them; `resume` refuses a checkpoint whose run differs and says what.

The weight digest is cheap but real: per tensor its name, dtype, shape, the exact integer sum of its raw words
(one pass at memory speed, independent of the reduction order, so the same on CPU and GPU and for any thread
count) and ~1024 evenly spaced raw elements, all into SHA-256. Any change of a weight's value changes the sum
unless changes cancel exactly; a swapped model changes nearly every word.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from array import array

import torch
from torch import nn

_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SAMPLES = 1024


def _tensor_digest(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel() == 0:
        return
    words = t.detach().contiguous().reshape(-1).view(_WORD[t.element_size()])
    total = int(words.sum(dtype=torch.int64))
    h.update(total.to_bytes(16, "little", signed=True))
    sample = words[::max(1, words.numel() // _SAMPLES)][:_SAMPLES]
    h.update(sample.cpu().numpy().tobytes())


def tensors_digest(named: dict) -> str:
    """SHA-256 of named tensors (name, dtype, shape, the integer sum of the raw words, sampled words)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for k, t in named.items():
            _tensor_digest(h, k, t)
    return h.hexdigest()


def _config_dict(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        d = dataclasses.asdict(cfg)
    elif hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
    else:
        d = dict(vars(cfg))
    drop = ("transformers_version", "name_or_path", "torch_dtype", "dtype")
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in drop}


def model_fingerprint(model: nn.Module, name=None) -> dict:
    """{"name", "config": sha256 of the config, "weights": the weight digest, "tensors"} of the base model
    (call it before a method is attached)."""
    cfg = json.dumps(_config_dict(model), sort_keys=True, default=str)
    h = hashlib.sha256()
    n = 0
    with torch.no_grad():   # buffers too, persistent or not: NF4Linear's packed weights are buffers
        for k, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            _tensor_digest(h, k, t)
            n += 1
    return {"name": name, "config": hashlib.sha256(cfg.encode()).hexdigest(), "weights": h.hexdigest(),
            "tensors": n}


def examples_fingerprint(examples: list, source) -> dict:
    """{"source", "examples", "tokens", "sha256"} of tokenized examples (ids, labels, packing boundaries)."""
    h = hashlib.sha256()
    tokens = 0
    for e in examples:
        h.update(len(e.input_ids).to_bytes(8, "little"))
        h.update(array("q", e.input_ids).tobytes())
        h.update(array("q", e.labels).tobytes())
        h.update(array("q", e.doc_lens or []).tobytes() + b"|")
        tokens += len(e.input_ids)
    return {"source": source, "examples": len(examples), "tokens": tokens, "sha256": h.hexdigest()}


def describe_differences(saved: dict, now: dict) -> list:
    """Human-readable differences between two run fingerprints ({"model", "data", "options"})."""
    out = []
    ms, mn = saved.get("model") or {}, now.get("model") or {}
    if ms.get("config") != mn.get("config"):
        out.append(f"the model's config differs (checkpoint: {ms.get('name')!r}, now: {mn.get('name')!r})")
    elif ms.get("weights") != mn.get("weights"):
        out.append(f"the model's weights differ (checkpoint: {ms.get('name')!r} digest {str(ms.get('weights'))[:12]}, "
                   f"now: {mn.get('name')!r} digest {str(mn.get('weights'))[:12]})")
    for part, label in (("train", "training data"), ("eval", "held-out data"), ("general", "general-text data")):
        a, b = (saved.get("data") or {}).get(part), (now.get("data") or {}).get(part)
        if (a or {}).get("sha256") != (b or {}).get("sha256"):
            def d(x):
                return "none" if not x else (f"{x['examples']} examples, {x['tokens']} tokens of {x['source']} "
                                             f"(sha256 {x['sha256'][:12]})")
            out.append(f"the {label} differs as tokenized (checkpoint: {d(a)}; now: {d(b)})")
    os_, on = saved.get("options") or {}, now.get("options") or {}
    changed = sorted(k for k in set(os_) | set(on) if os_.get(k) != on.get(k))
    if changed:
        out.append("training options differ (" + ", ".join(f"{k}: checkpoint {os_.get(k)!r} vs now {on.get(k)!r}"
                                                        for k in changed) + ")")
    return out
