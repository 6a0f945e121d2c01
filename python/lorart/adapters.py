"""LoRA adapter files in PEFT's format (adapter_config.json + adapter_model.safetensors).

Keys: ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]. Files
written by PEFT or lorart load into any model whose module paths match; pickle (``adapter_model.bin``) is
never loaded. Writes are atomic: a temporary folder beside the target, then renames.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ._atomic import atomic_dir
from .inject import lora_layers
from .nn.lora import LoRALinear, nf4_weight_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """A bad adapter file; the message names the file and the key."""


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    sd = {}
    for path, m in lora_layers(model).items():
        if adapter_name in m.adapter_names:
            sd[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A[adapter_name].weight.detach().cpu().contiguous()
            sd[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B[adapter_name].weight.detach().cpu().contiguous()
    return sd


def adapter_config(model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None,
                   task_type: str | None = "CAUSAL_LM") -> dict:
    layers = {p: m for p, m in lora_layers(model).items() if adapter_name in m.adapter_names}
    if not layers:
        raise ValueError(f"lorart: no LoRA layer of {type(model).__name__} has an adapter named {adapter_name!r}")
    ranks = {p: m.r[adapter_name] for p, m in layers.items()}
    alphas = {p: m.lora_alpha[adapter_name] for p, m in layers.items()}
    drops = {m.lora_dropout[adapter_name] for m in layers.values()}
    rs = {m.use_rslora[adapter_name] for m in layers.values()}
    if len(rs) > 1:
        raise ValueError(f"lorart: save_adapter: adapter {adapter_name!r} mixes rsLoRA and plain scaling across "
                         "layers, which PEFT's config cannot express")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    cfg = {
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": max(drops) if drops else 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {p: k for p, k in ranks.items() if k != r},
        "revision": None,
        "target_modules": sorted({_leaf(p) for p in layers}),
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": rs.pop(),
    }
    return cfg


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM") -> str:
    """Write adapter `adapter_name` of `model` to `directory` in PEFT's format, atomically. Returns the path."""
    from safetensors.torch import save_file

    cfg = adapter_config(model, adapter_name, base_model_name_or_path, task_type)
    sd = adapter_state_dict(model, adapter_name)
    bad = [k for k, t in sd.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(f"lorart: save_adapter: refusing to save {directory}: {len(bad)} tensors hold "
                               f"non-finite values (first: `{bad[0]}`)")
    text = json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False)
    directory = os.path.abspath(directory)
    with atomic_dir(directory) as tmp:
        save_file(sd, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            f.write(text + "\n")
    return directory


def read_adapter_config(directory: str) -> dict:
    """adapter_config.json of a PEFT LoRA folder, checked (the keys lorart relies on)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"lorart: {path}: missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"lorart: {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"lorart: {path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"lorart: {path}: key `peft_type`: expected 'LORA', got {cfg.get('peft_type')!r}")
    for k in ("r", "lora_alpha"):
        if k not in cfg:
            raise AdapterFileError(f"lorart: {path}: key `{k}` is missing")
    if cfg.get("use_dora"):
        raise AdapterFileError(f"lorart: {path}: key `use_dora`: DoRA adapters are not supported")
    if cfg.get("fan_in_fan_out"):
        raise AdapterFileError(f"lorart: {path}: key `fan_in_fan_out`: transposed (Conv1D) bases are not supported")
    return cfg


def _read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickles = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(directory, f))]
        why = (f"; found {pickles[0]}, a pickle, which lorart never loads (it can run code): convert it to "
               "safetensors with a tool you trust") if pickles else ""
        raise AdapterFileError(f"lorart: {path}: missing{why}")
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out
    except Exception as e:  # truncated / corrupt header or data
        raise AdapterFileError(f"lorart: {path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module path exactly or as a suffix."""
    for key, v in (patterns or {}).items():
        if path == key or path.endswith("." + key):
            return v
    return default


def _module_pairs(tensors: dict, wpath: str) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        parts = k.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            i = parts.index("lora_A") if "lora_A" in parts else parts.index("lora_B")
            # "<path>.lora_A.weight" or "<path>.lora_A.<adapter>.weight"
            if parts[-1] != "weight" or len(parts) - i not in (2, 3):
                raise AdapterFileError(f"lorart: {wpath}: key `{key}`: not a LoRA weight name")
            pairs.setdefault(".".join(parts[:i]), {})[parts[i]] = t
        else:
            raise AdapterFileError(f"lorart: {wpath}: key `{key}`: unsupported tensor (only LoRA A/B weights, e.g. no "
                                   "modules_to_save, DoRA magnitudes or embedding adapters)")
    return pairs


def load_adapter(model: nn.Module, directory: str, name: str = "default", dropout: float | None = None,
                 activate: bool = True, trainable: bool = False) -> list[str]:
    """Load the PEFT-format adapter in `directory` into `model` as adapter `name`. Linear layers named by the
    file that have no LoRA yet are wrapped in LoRALinear. All checks run before anything is changed. The
    loaded weights are frozen unless `trainable`.
    Returns the module paths that received the adapter."""
    cfg = read_adapter_config(directory)
    tensors = _read_tensors(directory)
    wpath = os.path.join(directory, WEIGHTS_NAME)
    pairs = _module_pairs(tensors, wpath)
    if not pairs:
        raise AdapterFileError(f"lorart: {wpath}: holds no LoRA weights")
    plan = []
    for path, ab in sorted(pairs.items()):
        for part in ("lora_A", "lora_B"):
            if part not in ab:
                raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.{part}.weight` is missing (the "
                                       f"other half of module {path!r} is present)")
        try:
            m = model.get_submodule(path)
        except AttributeError:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.lora_A.weight`: module {path!r} does not "
                                   f"exist in {type(model).__name__}") from None
        if not isinstance(m, LoRALinear) and not isinstance(m, nn.Linear) and nf4_weight_of(m) is None:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.lora_A.weight`: module {path!r} is a "
                                   f"{type(m).__name__}, not a linear layer")
        if isinstance(m, LoRALinear) and name in m.adapter_names:
            raise ValueError(f"lorart: load_adapter: module {path!r} already has an adapter named {name!r}")
        A, B = ab["lora_A"], ab["lora_B"]
        r = int(_pattern_value(cfg.get("rank_pattern"), path, cfg["r"]))
        if A.dim() != 2 or A.shape != (A.shape[0], m.in_features) or A.shape[0] == 0:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.lora_A.weight`: expected shape "
                                   f"[r, {m.in_features}], got {list(A.shape)}")
        if B.dim() != 2 or B.shape != (m.out_features, A.shape[0]):
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.lora_B.weight`: expected shape "
                                   f"[{m.out_features}, {A.shape[0]}], got {list(B.shape)}")
        if r != A.shape[0]:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.lora_A.weight`: rank {A.shape[0]} "
                                   f"disagrees with the config's r / rank_pattern ({r})")
        for key, t in ((f"{path}.lora_A.weight", A), (f"{path}.lora_B.weight", B)):
            if not t.dtype.is_floating_point or not torch.isfinite(t).all():
                raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{key}`: expected finite floats")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), path, cfg["lora_alpha"]))
        plan.append((path, m, A, B, r, alpha))
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted({_leaf(p) for p, *_ in plan} - set(targets))
        if unknown:
            raise AdapterFileError(f"lorart: {os.path.join(directory, CONFIG_NAME)}: key `target_modules` "
                                   f"{targets} does not list modules with weights in the file: {unknown}")
    p = float(cfg.get("lora_dropout", 0.0) if dropout is None else dropout)
    rs = bool(cfg.get("use_rslora", False))
    done = []
    for path, m, A, B, r, alpha in plan:
        if isinstance(m, LoRALinear):
            prev = m.active_adapter
            m.add_adapter(name, r, alpha, p, rs, init=False)
            if not activate and prev is not None:
                m.active_adapter = prev
        else:
            m = LoRALinear(m, r, alpha, p, rs, name, init=False)
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, m)
        with torch.no_grad():
            wa, wb = m.lora_A[name].weight, m.lora_B[name].weight
            wa.copy_(A.to(wa.dtype))
            wb.copy_(B.to(wb.dtype))
            wa.requires_grad_(trainable)
            wb.requires_grad_(trainable)
        done.append(path)
    return done


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "adapter_config", "AdapterFileError",
           "CONFIG_NAME", "WEIGHTS_NAME"]
