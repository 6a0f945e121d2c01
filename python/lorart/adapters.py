"""LoRA adapter files in PEFT's format (adapter_config.json + adapter_model.safetensors).

Keys: ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]. Files
written by PEFT or lorart load into any model whose module paths match; pickle (``adapter_model.bin``) is
never loaded. Writes are atomic: a temporary folder beside the target, then renames.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ._atomic import atomic_dir
from .errors import FileFormatError, InputError
from .fileformats import Fields, read_json, read_method_file, read_safetensors
from .inject import ModelEdit, lora_layers
from .nn.lora import LoRALinear, nf4_weight_of
from .nn.selection import MUTATION_LOCK

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFileError(FileFormatError):
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
    for k, t in sd.items():   # never write a file the loader would refuse
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"lorart: save_adapter: refusing to write {directory}: `{k}` holds NaN or infinite "
                             "values (did the training diverge?)")
    directory = os.path.abspath(directory)
    with atomic_dir(directory) as tmp:
        save_file(sd, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True, allow_nan=False)
    return directory


# Options of a PEFT LoRA config that change the math lorart (and its C++ store) would apply: refused when set.
MATH_CHANGING = {
    "use_dora": "DoRA adapters are not supported",
    "fan_in_fan_out": "transposed (Conv1D) bases are not supported",
    "lora_bias": "LoRA biases (lora_B with a bias) are not supported",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "layer_replication": "layer replication is not supported",
    "target_parameters": "LoRA on parameters (not modules) is not supported",
    "trainable_token_indices": "trainable tokens are not supported",
    "alora_invocation_tokens": "activated LoRA is not supported",
    "modules_to_save": "adapters with fully trained modules are not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "velora_config": "VeLoRA is not supported",
}


@dataclass
class LoraFileConfig:
    """A checked PEFT LoRA `adapter_config.json` (the rules the C++ AdapterConfig::parse applies too)."""
    path: str
    r: int
    alpha: float
    rslora: bool
    dropout: float
    targets: object            # list of names (PEFT suffix rule), a regex string, or None
    rank_pattern: dict
    alpha_pattern: dict
    base_model_name_or_path: str | None

    def rank(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, module, self.r)

    def alpha_of(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.alpha))


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key, in file
    order, that matches the module path as the regex `(.*[.])?(KEY)` (so a plain name matches as a suffix)."""
    for key, v in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return v
    return default


def read_lora_config(directory: str) -> LoraFileConfig:
    """Read and check `adapter_config.json` of a PEFT LoRA folder (types exact, numbers finite)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"lorart: {path}: missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    f = Fields(read_json(path, AdapterFileError), path, error=AdapterFileError)
    f.str("peft_type", "LORA", choices=("LORA",))
    r = f.int("r", min=1)
    alpha = f.number("lora_alpha")
    for key, why in MATH_CHANGING.items():
        f.refuse_set(key, why)
    if f.str("bias", "none") != "none":
        f.fail("bias", "'none' (trained biases are not supported)", f.obj["bias"])
    targets = f.obj.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        targets = f.str_list("target_modules")
    ranks = f.obj_of("rank_pattern", "int", min=1)
    alphas = f.obj_of("alpha_pattern", "number")
    for key in list(ranks) + list(alphas):
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterFileError(f"lorart: {path}: key `{'rank' if key in ranks else 'alpha'}_pattern.{key}`: not "
                                   f"a valid regular expression ({e})") from None
    return LoraFileConfig(path=path, r=r, alpha=float(alpha), rslora=f.bool("use_rslora", False),
                          dropout=float(f.number("lora_dropout", 0.0, lo=0.0, hi=1.0)), targets=targets,
                          rank_pattern=ranks, alpha_pattern=alphas,
                          base_model_name_or_path=f.str("base_model_name_or_path", None))


LORA_METHOD_KEYS = ("targets", "r", "alpha", "dropout", "rslora", "blocksize", "double_quant")


def check_method_file(directory: str, cfg: LoraFileConfig) -> None:
    """A lorart LoRA folder also holds lorart_method.json: it must be a known format, its config typed as
    lorart's LoRAConfig / QLoRAConfig, and agree with the PEFT config (a file that says one thing and a config
    that says another is refused, not guessed). The C++ store applies the same rules."""
    meta = read_method_file(directory, AdapterFileError)
    if meta is None:
        return
    mpath, c = meta["path"], meta["config"]
    if meta["method"] not in ("lora", "qlora"):
        raise AdapterFileError(f"lorart: {mpath}: key `method`: a {meta['method']!r} artifact, not a LoRA adapter")
    f = Fields(c, mpath, "config.", AdapterFileError)
    unknown = sorted(set(c) - set(LORA_METHOD_KEYS))
    if unknown:
        raise AdapterFileError(f"lorart: {mpath}: key `config.{unknown[0]}`: not an option of a LoRA method")
    if c.get("targets") is not None and not isinstance(c["targets"], str):
        f.str_list("targets")
    got = {"r": f.int("r", None, min=1), "alpha": f.number("alpha", None), "rslora": f.bool("rslora", None)}
    f.number("dropout", None, lo=0.0, hi=1.0)
    f.int("blocksize", None, min=1)
    f.bool("double_quant", None)
    for key, want in (("r", cfg.r), ("alpha", cfg.alpha), ("rslora", cfg.rslora)):
        if got[key] is not None and got[key] != want:
            raise AdapterFileError(f"lorart: {mpath}: key `config.{key}` is {c[key]!r} but {cfg.path} says "
                                   f"{want!r}: the two files disagree")


def read_lora_tensors(directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"lora_A": A, "lora_B": B}, from `adapter_model.safetensors` (float32/bf16/fp16, finite)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickles = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(directory, f))]
        why = (f"; found {pickles[0]}, a pickle, which lorart never loads (it can run code): convert it to "
               "safetensors with a tool you trust") if pickles else ""
        raise AdapterFileError(f"lorart: {path}: missing{why}")
    tensors = read_safetensors(path, AdapterFileError)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            what = ("unsupported tensor (only LoRA A/B weights, e.g. no modules_to_save, DoRA magnitudes or "
                    "embedding adapters)") if ".lora_" not in key else (
                "not a LoRA weight name (expected base_model.model.<module>.lora_A.weight / .lora_B.weight)")
            raise AdapterFileError(f"lorart: {path}: key `{key}`: {what}")
        if t.dim() != 2 or 0 in t.shape:
            raise AdapterFileError(f"lorart: {path}: key `{key}`: expected a non-empty 2-d tensor, got shape "
                                   f"{list(t.shape)}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise AdapterFileError(f"lorart: {path}: holds no LoRA weights")
    return pairs


def read_lora_folder(directory: str) -> tuple[LoraFileConfig, dict[str, dict[str, torch.Tensor]]]:
    """The one strict reader of a PEFT LoRA folder: config, lorart_method.json agreement, tensors, and every
    rule that needs no model (pairs complete, ranks = r / rank_pattern, target_modules lists every module)."""
    cfg = read_lora_config(directory)
    check_method_file(directory, cfg)
    pairs = read_lora_tensors(directory)
    wpath = os.path.join(directory, WEIGHTS_NAME)
    for mod, ab in sorted(pairs.items()):
        for part in ("lora_A", "lora_B"):
            if part not in ab:
                raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{mod}.{part}.weight` is missing (the "
                                       f"other half of module {mod!r} is present)")
        A, B = ab["lora_A"], ab["lora_B"]
        r = cfg.rank(mod)
        if A.shape[0] != r:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{mod}.lora_A.weight`: rank {A.shape[0]} "
                                   f"disagrees with the config's r / rank_pattern ({r})")
        if B.shape[1] != r:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{mod}.lora_B.weight`: expected shape "
                                   f"[out, {r}], got {list(B.shape)}")
    if isinstance(cfg.targets, list):
        unknown = sorted(m for m in pairs if not any(m == t or m.endswith("." + t) for t in cfg.targets))
        if unknown:
            raise AdapterFileError(f"lorart: {cfg.path}: key `target_modules` {cfg.targets} does not list modules "
                                   f"with weights in the file: {sorted({_leaf(m) for m in unknown})}")
    return cfg, pairs


def load_adapter(model: nn.Module, directory: str, name: str = "default", dropout: float | None = None,
                 activate: bool = True, trainable: bool = False) -> list[str]:
    """Load the PEFT-format adapter in `directory` into `model` as adapter `name`. Linear layers named by the
    file that have no LoRA yet are wrapped in LoRALinear. All checks run before anything is changed, and a
    failure while changing it (out of memory, an interrupt) undoes what was done. With `activate` the adapter
    becomes the active one of the layers it covers; without, the model's output is unchanged (layers it wraps
    run their base until an adapter is selected). The loaded weights are frozen unless `trainable`.
    Thread-safe: loads into one model run one after the other (lorart.nn.selection.MUTATION_LOCK), and
    forwards in other threads see each layer before or after the adapter was added, never half of it.
    Returns the module paths that received the adapter."""
    cfg, pairs = read_lora_folder(directory)   # the files are read and checked before taking the lock
    with MUTATION_LOCK:
        return _apply_lora(model, cfg, pairs, os.path.join(directory, WEIGHTS_NAME), name, dropout, activate,
                           trainable)


def _apply_lora(model: nn.Module, cfg: LoraFileConfig, pairs: dict, wpath: str, name: str, dropout, activate: bool,
                trainable: bool) -> list[str]:
    plan = []
    for path, ab in sorted(pairs.items()):
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
        r = A.shape[0]
        if A.shape[1] != m.in_features:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.lora_A.weight`: expected shape "
                                   f"[r, {m.in_features}], got {list(A.shape)}")
        if B.shape[0] != m.out_features:
            raise AdapterFileError(f"lorart: {wpath}: key `{PREFIX}{path}.lora_B.weight`: expected shape "
                                   f"[{m.out_features}, {r}], got {list(B.shape)}")
        plan.append((path, m, A, B, r, cfg.alpha_of(path)))
    p = float(cfg.dropout if dropout is None else dropout)
    rs = cfg.rslora
    done = []
    with ModelEdit(model) as edit:   # all or nothing
        for path, m, A, B, r, alpha in plan:
            if isinstance(m, LoRALinear):   # the adapter is complete (weights, flags) before a forward can see it
                edit.add_adapter(m, name, r=r, alpha=alpha, dropout=p, rslora=rs, init=False, activate=activate,
                                 weights=(A, B), trainable=trainable)
            else:
                new = LoRALinear(m, r, alpha, p, rs, name, init=False).train(m.training)  # the replaced layer's mode
                with torch.no_grad():
                    for w, t in ((new.lora_A[name].weight, A), (new.lora_B[name].weight, B)):
                        w.copy_(t.to(w.dtype))
                        w.requires_grad_(trainable)
                if not activate:
                    new.active_adapter = None
                edit.replace(path, new)
            done.append(path)
    return done


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "adapter_config", "AdapterFileError",
           "CONFIG_NAME", "WEIGHTS_NAME", "read_lora_config", "read_lora_folder", "LoraFileConfig"]
