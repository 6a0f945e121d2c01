"""Load and save Llama-family models as Hugging Face folders (safetensors only).

Weights are streamed tensor by tensor into a model built on the `meta` device, so no fp32
copy of the model is ever built. `linear_factory(name, linear) -> nn.Module` is called for
each decoder-layer `nn.Linear` as soon as its weight (and bias) are loaded, in the target
dtype and device; whatever it returns replaces the linear (e.g. `NF4Linear.from_linear`).
`lm_head` is never passed to the factory (it is often tied to the embedding).

bitsandbytes 4-bit folders (`quantization_config` with `load_in_4bit`, NF4; models/bnb4.py) load with
their 4-bit layers as `NF4Linear` (the stored bytes as they are, computing in `dtype`); the factory is called
for the dense linears only. A model holding `NF4Linear` layers is saved in that form.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..errors import FileFormatError, InputError
from ..fileformats import Fields, read_json
from . import bnb4
from .config import LlamaConfig
from .llama import LlamaForCausalLM
from .tokenizer import Tokenizer

LinearFactory = Callable[[str, nn.Linear], nn.Module]
_IGNORED_KEYS = ("rotary_emb.inv_freq",)


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]



def _set_param(model: nn.Module, name: str, tensor: torch.Tensor, source: str) -> None:
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = mod._parameters.get(pname)
    if old is None:
        raise ValueError(f"{source}: tensor {name!r} has no matching parameter in the model")
    if tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(old.shape)}")
    mod._parameters[pname] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def build_model(config: LlamaConfig, keys: Iterable[str], get_tensor: Callable[[str], torch.Tensor],
                dtype=torch.float32, device="cpu", linear_factory: Optional[LinearFactory] = None,
                source: str = "checkpoint") -> LlamaForCausalLM:
    """Assemble a model from named tensors (HF names) fetched one at a time by `get_tensor`."""
    dtype = as_dtype(dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    available = {k for k in keys if not k.endswith(_IGNORED_KEYS)}
    quantized = bnb4.quantized_linears(available, source)
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    outside = sorted(set(quantized) - {n for n, _ in linears})
    if outside:
        raise ValueError(f"{source}: {', '.join(outside[:4])} stored in 4-bit: lorart reads 4-bit weights for "
                         "the decoder layers' linears only (transformers keeps lm_head and embeddings dense)")
    for name, qkeys in quantized.items():
        available = (available - qkeys) | {f"{name}.weight"}
    expected = set(model.state_dict().keys())
    tied = config.tie_word_embeddings
    if tied:
        available.discard("lm_head.weight")
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - available), sorted(available - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")

    def fetch(name, kept: bool = True):
        t = get_tensor(name)
        if not t.is_floating_point():
            raise FileFormatError(f"lorart: {source}: tensor {name!r}: expected a floating-point dtype, got "
                                  f"{str(t.dtype).replace('torch.', '')}")
        out = t.to(device=device, dtype=dtype)
        aliases = out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        if kept and aliases and linear_factory is not None:
            # safetensors' tensors share one mapping of the whole file: a tensor kept as it is would keep every page
            # the factory read (QLoRA: the whole float32 model) resident for the life of the model
            out = out.clone()
        return out

    done = set()
    for name, lin in linears:
        parent, _, child = name.rpartition(".")
        if name in quantized:  # stored in 4-bit: an NF4Linear over the stored bytes, never dequantized
            bias = fetch(f"{name}.bias") if lin.bias is not None else None
            new = bnb4.nf4_linear_from_keys(name, quantized[name], get_tensor, lin, bias, dtype, device, source)
            setattr(model.get_submodule(parent), child, new)
            done.update(k for k in (f"{name}.weight", f"{name}.bias") if k in expected)
            continue
        for pname in ("weight", "bias"):
            if getattr(lin, pname) is not None:
                _set_param(model, f"{name}.{pname}", fetch(f"{name}.{pname}", kept=pname == "bias"), source)
                done.add(f"{name}.{pname}")
        if linear_factory is not None:
            new = linear_factory(name, model.get_submodule(name))
            if new is None:
                raise ValueError(f"linear_factory returned None for {name!r}")
            setattr(model.get_submodule(parent), child, new)
    for name in sorted(expected - done):
        _set_param(model, name, fetch(name), source)
    model.tie_weights()
    model.model.rotary_emb.reset(device)
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            raise RuntimeError(f"{source}: {n} was not loaded")
    return model.eval()


def _weight_index(folder: str) -> dict:
    """Map tensor name -> safetensors file; refuse pickled weights and index entries outside `folder`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        f = Fields(read_json(index), index)
        wmap = f.obj.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            f.fail("weight_map", "a non-empty object of tensor name -> shard file name", wmap)
        root = os.path.abspath(folder)   # lexical: symlinked shards (the HF hub cache's blobs) stay allowed
        out = {}
        for k, v in wmap.items():
            if not isinstance(v, str) or not v or os.path.isabs(v) or "\0" in v:
                raise FileFormatError(f"lorart: {index}: key `weight_map.{k}`: expected the name of a shard file in "
                                      f"the model folder, got {v!r}")
            path = os.path.normpath(os.path.join(root, v))
            if not path.startswith(root + os.sep):
                raise FileFormatError(f"lorart: {index}: key `weight_map.{k}`: {v!r} points outside the model "
                                      f"folder {folder}; refused")
            out[k] = path
        return out
    if os.path.exists(single):
        from safetensors import safe_open
        try:
            with safe_open(single, framework="pt") as f:
                return {k: single for k in f.keys()}
        except Exception as e:
            raise _unreadable(single, e) from None
    pickled = [os.path.basename(p) for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt")
               for p in glob.glob(os.path.join(folder, ext))]
    if pickled:
        raise ValueError(f"{folder}: found only pickled .bin/.pt weights ({', '.join(sorted(pickled))}); "
                         "lorart refuses to load pickled weights (they can run arbitrary code). "
                         "Convert them to safetensors first (e.g. transformers' save_pretrained "
                         "with safe_serialization=True).")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _unreadable(path: str, e: Exception, key: str | None = None) -> FileFormatError:
    at = f": key `{key}`" if key else ""
    return FileFormatError(f"lorart: {path}{at}: not a readable safetensors file ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]})")


def load_hf_folder(folder: str, dtype=torch.float32, device="cpu",
                   linear_factory: Optional[LinearFactory] = None):
    """Load `(model, tokenizer)` from an HF folder; tokenizer is None without tokenizer.json."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{folder}: missing config.json")
    config = LlamaConfig.from_json_file(cfg_path)
    bnb4.read_quantization_config(folder)  # refuses the quantized forms lorart cannot read, with the reason
    index = _weight_index(folder)
    from safetensors import safe_open
    handles = {}
    try:
        for path in sorted(set(index.values())):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{folder}: shard {os.path.basename(path)} listed in the "
                                        "index is missing")
            try:
                handles[path] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise _unreadable(path, e) from None

        def get(k):
            try:
                return handles[index[k]].get_tensor(k)
            except Exception as e:   # a key the index lists but the shard lacks, truncated data
                raise _unreadable(index[k], e, k) from None

        model = build_model(config, index.keys(), get, dtype=dtype, device=device, linear_factory=linear_factory,
                            source=folder)
    finally:
        handles.clear()
    return model, Tokenizer.from_folder(folder)


def check_plain(model: nn.Module) -> None:
    """Refuse a model whose weights are not exactly those of a plain LlamaForCausalLM of its config (LoRA or NF4
    layers still wrapped, prompt encoders, adapters, added biases): transformers would load such a folder with
    weights missing and silently random."""
    if not isinstance(model, LlamaForCausalLM):
        raise InputError(f"lorart: save_hf_folder: expected a lorart LlamaForCausalLM, got {type(model).__name__}")
    with torch.device("meta"):
        ref_model = LlamaForCausalLM(model.config)
    ref, have = ref_model.state_dict(), model.state_dict()
    nf4_keys = bnb4.quantized_keys(model)  # NF4Linear layers: saved as bitsandbytes 4-bit weights
    if nf4_keys:
        have = {k: v for k, v in have.items() if k not in nf4_keys}
        ref = {k: v for k, v in ref.items() if k not in nf4_keys}
    for sd in (ref, have):
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
    extra, missing = sorted(set(have) - set(ref)), sorted(set(ref) - set(have))
    bad = [k for k in sorted(set(have) & set(ref)) if tuple(have[k].shape) != tuple(ref[k].shape)
           or not have[k].is_floating_point()]
    if extra or missing or bad:
        key = (extra or missing or bad)[0]
        mine, theirs = dict(model.named_modules()), dict(ref_model.named_modules())
        parts = key.split(".")[:-1]
        path = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                     if p in mine and (p not in theirs or type(mine[p]) is not type(theirs[p]))), "")
        kind = type(mine[path]).__name__ if path else type(model).__name__
        raise InputError(f"lorart: save_hf_folder: the model is not a plain {type(model).__name__}: "
                         f"{len(extra)} unexpected, {len(missing)} missing and {len(bad)} mis-shaped weights, e.g. "
                         f"`{key}` ({path or 'model'} is a {kind}); a folder written now would load with weights "
                         "missing. Merge first: lorart.merge_and_unload(model)")


def save_hf_folder(model: LlamaForCausalLM, folder: str, tokenizer: Optional[Tokenizer] = None,
                   dtype=None) -> None:
    """Write config.json, model.safetensors, generation_config.json (and the tokenizer's files) readable by
    transformers. Each file is written atomically (temp + rename). `NF4Linear` layers are written as bitsandbytes
    4-bit weights (their bytes as they are) with the `quantization_config` transformers + bitsandbytes need to load
    the folder; `dtype` applies to the rest. A model with wrapped layers (LoRA) or added modules is refused (merge
    it first: lorart.merge_and_unload)."""
    from safetensors.torch import save_file

    from .._atomic import atomic_file
    check_plain(model)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or v.is_meta:
            raise ValueError(f"cannot save {k!r}: not a materialized tensor (was a linear replaced?)")
    dt = as_dtype(dtype) if dtype is not None else model.dtype
    keep = bnb4.quantized_keys(model)
    sd = {k: v.detach().to("cpu", dtype=dt if v.is_floating_point() and k not in keep else v.dtype).contiguous()
          for k, v in sd.items()}
    with atomic_file(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(sd, tmp, metadata={"format": "pt"})
    cfg = model.config.to_hf_dict(dt)
    qc = bnb4.quantization_config(model, dt)
    if qc is not None:
        cfg["quantization_config"] = qc
    with atomic_file(os.path.join(folder, "config.json")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    if tokenizer is not None:
        tokenizer.save(folder)
        gen = {"bos_token_id": tokenizer.bos_id,
               "eos_token_id": tokenizer.eos_ids[0] if len(tokenizer.eos_ids) == 1 else tokenizer.eos_ids,
               "pad_token_id": tokenizer.pad_id}
    with atomic_file(os.path.join(folder, "generation_config.json")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)
