"""Ship a fine-tuned model: merge the method into the base weights and write a Hugging Face folder or a GGUF file.

    model = lorart.merge_and_unload(model)          # LoRA layers folded in, plain nn.Linear everywhere
    lorart.export(model="base/", adapter="lorart-output/adapter", out="merged/", format="hf", dtype="bf16")
    lorart export --model base/ --adapter lorart-output/adapter --out merged.gguf --format gguf --gguf-type q8_0

- LoRA: W + scaling * B @ A, computed in float32 from the base as stored, then written in the dtype asked.
- QLoRA: the adapter was trained on dequant(W4), so the merge is dequant(W4) + scaling * B @ A (NF4 quantized
  from the base loaded in float32, as a CPU training run does), not the original float weights.
- full: the trained weights; bitfit: the trained biases (zero biases are added to the other projections of the
  same group, as Llama's config can only switch biases on for all of q/k/v/o or all of gate/up/down).
- adapter / prefix / prompt add modules or virtual tokens a plain Llama does not have: refused.
Every output is written atomically (a temporary folder or file beside it, then a rename).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .errors import InputError

HF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MERGEABLE = ("lora", "qlora", "full", "bitfit")


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a float32 tensor: dequant(W4) for NF4 layers."""
    from .nn.lora import nf4_weight_of

    w4 = nf4_weight_of(base)
    if w4 is not None:
        return w4.dequantize().float()
    return base.weight.detach().float()


def _plain_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias.detach().to(dtype))
    lin.weight.requires_grad_(False)
    if bias is not None:
        lin.bias.requires_grad_(False)
    return lin


def merge_and_unload(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold each LoRA layer's active adapter into its base weight (float32 arithmetic) and replace the layer by a
    plain `nn.Linear`; NF4 layers (with or without LoRA) become dense: dequant(W4) (+ the adapter). Returns
    `model`, changed in place. `dtype`: of the new linears (default: the float base's dtype; for NF4 layers the
    dtype they were quantized from). A merged weight that is not finite is refused before anything changes."""
    from .nn.lora import LoRALinear, nf4_weight_of

    plan = []
    for path, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            base = m.base_layer
            names = [m.active_adapter] if m.active_adapter is not None and not m.disabled else []
            m.unmerge()   # the base exactly as it was (a merged layer keeps its original)
            w = _dense_weight(base)
            for n in names:
                a, b = m.lora_A[n].weight.detach().float(), m.lora_B[n].weight.detach().float()
                w = w + m.scaling[n] * (b.to(w.device) @ a.to(w.device))
            w4 = nf4_weight_of(base)
            out_dtype = dtype or (w4.dtype if w4 is not None else base.weight.dtype)
            plan.append((path, w, base.bias, out_dtype))
        elif nf4_weight_of(m) is not None and not path.endswith(".base_layer"):   # NF4 without LoRA
            plan.append((path, _dense_weight(m), m.bias, dtype or nf4_weight_of(m).dtype))
    for path, w, _, _ in plan:
        if not bool(torch.isfinite(w).all()):
            raise InputError(f"lorart: merge_and_unload: the merged weight of {path!r} is not finite (NaN or "
                             "infinity): the adapter or the base holds non-finite values")
    for path, w, bias, out_dtype in plan:
        parent, _, leaf = path.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, _plain_linear(w, bias, out_dtype).train(getattr(holder, leaf).training))
    return model


def _plain_biases(model: nn.Module) -> None:
    """BitFit's biases on projections the config has none on: give the rest of the group zero biases and switch
    the config's attention_bias / mlp_bias on (a Llama config cannot express biases on a subset)."""
    from .models import LlamaForCausalLM

    with torch.device("meta"):
        ref = LlamaForCausalLM(model.config)
    extra = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
             and isinstance(ref.get_submodule(n), nn.Linear) and ref.get_submodule(n).bias is None]
    if not extra:
        return
    c = model.config
    if c.model_type != "llama":
        raise InputError(f"lorart: export: {extra[0]} has a bias a {c.model_type} config cannot express")
    for flag, sub, names in (("attention_bias", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp_bias", "mlp", ("gate_proj", "up_proj", "down_proj"))):
        if not any(f".{sub}." in n for n in extra):
            continue
        for layer in model.model.layers:
            for n in names:
                lin = getattr(getattr(layer, sub), n)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device), requires_grad=False)
        setattr(c, flag, True)
        if flag == "attention_bias":
            c.o_proj_bias = True


def recorded_base(adapter: str) -> Optional[str]:
    """The base an adapter folder names (lorart_method.json, else adapter_config.json) when it is a local model
    folder or GGUF file that exists; None (the embedded default) otherwise."""
    from .fileformats import read_json, read_method_file

    meta = read_method_file(adapter, InputError) if os.path.isdir(adapter) else None
    name = meta.get("base_model_name_or_path") if meta else None
    cfg = os.path.join(adapter, "adapter_config.json")
    if name is None and os.path.isfile(cfg):
        name = read_json(cfg, InputError).get("base_model_name_or_path")
    return name if isinstance(name, str) and os.path.exists(name) else None


def merged_model(model=None, adapter: Optional[str] = None, device="cpu"):
    """(model, tokenizer) with the method in `adapter` merged: `model` a path / "default" (loaded in float32), a
    loaded lorart model (then pass its tokenizer to `export`), or None: the base the adapter records when it is a
    local path, else the embedded default."""
    from . import methods
    from .fileformats import read_method_file
    from .models import LlamaForCausalLM, load_model

    tok = None
    if model is None and adapter is not None:
        model = recorded_base(os.fspath(adapter))
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tok = load_model(None if model is None else os.fspath(model), dtype=torch.float32, device=device)
    elif not isinstance(model, LlamaForCausalLM):
        raise InputError(f"lorart: export: argument `model`: expected a path or a lorart LlamaForCausalLM, got "
                         f"{type(model).__name__}")
    if adapter is not None:
        meta = read_method_file(os.fspath(adapter), InputError) if os.path.isdir(adapter) else None
        if meta is not None and meta["method"] not in MERGEABLE:
            raise InputError(f"lorart: export: {meta['path']}: method {meta['method']!r} cannot be merged into the "
                             f"base weights (it adds modules or virtual tokens a plain model has not); export "
                             f"supports {', '.join(MERGEABLE)}")
        m = methods.load(model, os.fspath(adapter))
        if m.name not in MERGEABLE:
            raise InputError(f"lorart: export: method {m.name!r} cannot be merged into the base weights; export "
                             f"supports {', '.join(MERGEABLE)}")
    merge_and_unload(model)
    _plain_biases(model)
    return model.eval(), tok


def export(model=None, adapter: Optional[str] = None, out: str = "lorart-export", format: str = "hf",
           dtype: str = "bf16", gguf_type: str = "f16", tokenizer=None, device="cpu") -> str:
    """Merge `adapter` (a lorart method folder or a PEFT LoRA folder) into the base `model` and write it to `out`:
    `format="hf"`: a Hugging Face folder (model.safetensors in `dtype` bf16|fp16|fp32, config.json,
    generation_config.json, tokenizer files and chat template); `format="gguf"`: one GGUF file (`gguf_type`
    f16|q8_0|f32). Returns the path written."""
    from ._atomic import atomic_dir, atomic_file
    from .models import save_hf_folder
    from .models.gguf_export import GGUF_TYPES, write_gguf

    if format not in ("hf", "gguf"):
        raise InputError(f"lorart: export: argument `format`: expected 'hf' or 'gguf', got {format!r}")
    if format == "hf" and dtype not in HF_DTYPES:
        raise InputError(f"lorart: export: argument `dtype`: expected one of {', '.join(HF_DTYPES)}, got {dtype!r}")
    if format == "gguf" and gguf_type not in GGUF_TYPES:
        raise InputError(f"lorart: export: argument `gguf_type`: expected one of {', '.join(GGUF_TYPES)}, got "
                         f"{gguf_type!r}")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (os.path.isdir(out) != (format == "hf")):
        raise InputError(f"lorart: export: argument `out`: {out} exists and is a {'folder' if os.path.isdir(out) else 'file'}; "
                         f"format {format!r} writes a {'folder' if format == 'hf' else 'file'}")
    merged, tok = merged_model(model, adapter, device)
    tok = tokenizer if tokenizer is not None else tok
    if format == "hf":
        with atomic_dir(out) as tmp:
            save_hf_folder(merged, tmp, tok, dtype=HF_DTYPES[dtype])
    else:
        with atomic_file(out) as tmp:
            write_gguf(merged, tok, tmp, gguf_type)
    return out


def add_subcommand(sub) -> None:
    c = sub.add_parser("export", help="merge a trained method into its base model and write an HF folder or a GGUF file")
    c.add_argument("--model", help="the base: HF model folder or .gguf file (default: the local base the adapter "
                                   "records, else the embedded model)")
    c.add_argument("--adapter", help="the trained folder (lorart-output/adapter: lora, qlora, full, bitfit; or a PEFT "
                                     "LoRA folder; default: none, the base model alone, converted)")
    c.add_argument("--out", required=True, help="the folder (hf) or file (gguf) to write (required)")
    c.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="an HF safetensors folder or a llama.cpp GGUF file (default hf)")
    c.add_argument("--dtype", choices=list(HF_DTYPES), default="bf16", help="weights of an hf export (default bf16)")
    c.add_argument("--gguf-type", choices=["f16", "q8_0", "f32"], default="f16",
                   help="2-d weights of a gguf export (default f16; norms stay f32)")
    c.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    path = export(args.model, args.adapter, args.out, format=args.format, dtype=args.dtype, gguf_type=args.gguf_type)
    print(path)
    return 0


__all__ = ["merge_and_unload", "export", "merged_model"]
