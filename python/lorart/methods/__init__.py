"""Fine-tuning methods behind one interface: full, lora, qlora, adapter, prefix, prompt, bitfit.

    m = lorart.methods.prepare(model, "adapter", {"bottleneck": 32})   # attaches it, freezes the rest
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=m.default_lr)
    ... train ...
    m.save("out/adapter")                       # only what it trained (safetensors) + lorart_method.json
    m2 = lorart.methods.load(base_model, "out/adapter")   # also reads PEFT LoRA / prompt / prefix folders
    lorart.methods.storage_bytes("out/adapter")

Each method's options are the fields of its Config dataclass (`lorart.methods.METHODS[name].Config`).
"""
from __future__ import annotations

import inspect
import os

from torch import nn

from .adapter import AdapterConfig, AdapterMethod
from ..fileformats import Fields, read_method_file
from .base import METHOD_FILE, Method, MethodError, dir_size, make_config, read_json
from .bitfit import BitFitConfig, BitFitMethod
from .full import FullConfig, FullMethod
from .lora import LoRAConfig, LoRAMethod, QLoRAConfig, QLoRAMethod
from .prefix import PrefixConfig, PrefixMethod
from .prompt import PromptConfig, PromptMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (FullMethod, LoRAMethod, QLoRAMethod, AdapterMethod,
                                                       PrefixMethod, PromptMethod, BitFitMethod)}
PEFT_TYPES = {"LORA": LoRAMethod, "PROMPT_TUNING": PromptMethod, "PREFIX_TUNING": PrefixMethod}


def method_class(method: str) -> type[Method]:
    if not isinstance(method, str) or method not in METHODS:
        raise MethodError(f"lorart: argument `method`: expected one of {', '.join(METHODS)}, got {method!r}")
    return METHODS[method]


def prepare(model: nn.Module, method: str, cfg=None, tokenizer=None, **options) -> Method:
    """Attach `method` to `model` (options from `cfg` (dict or the method's Config) and keyword overrides) and
    return it. `tokenizer` turns prompt/prefix `init_text` into token ids."""
    cls = method_class(method)
    config = make_config(cls, cfg, **options)
    text = getattr(config, "init_text", None)
    if text is not None and not getattr(config, "init_token_ids", None):
        if tokenizer is None:
            raise MethodError(f"lorart: method {method!r}: option `init_text` needs the `tokenizer` argument")
        ids = tokenizer.encode(text, add_bos=False) if _takes_add_bos(tokenizer) else tokenizer.encode(text)
        if not ids:
            raise MethodError(f"lorart: method {method!r}: option `init_text`: {text!r} has no tokens")
        config.init_token_ids = tuple(int(i) for i in ids)
    return cls(model, config)


def _takes_add_bos(tok) -> bool:
    try:
        return "add_bos" in inspect.signature(tok.encode).parameters
    except (TypeError, ValueError):
        return False


def load(model: nn.Module, directory: str, trainable: bool = False) -> Method:
    """Attach the method saved in `directory` (a lorart method folder, or a PEFT LoRA / PROMPT_TUNING /
    PREFIX_TUNING folder) to the base `model`."""
    if not os.path.isdir(directory):
        raise MethodError(f"lorart: {directory}: not a directory (a trained method folder holds {METHOD_FILE} "
                          "or PEFT's adapter_config.json)")
    meta = read_method_file(directory, MethodError)
    if meta is not None:
        if meta["method"] not in METHODS:
            raise MethodError(f"lorart: {meta['path']}: key `method`: expected one of {', '.join(METHODS)}, got "
                              f"{meta['method']!r}")
        return METHODS[meta["method"]].load(model, directory, trainable=trainable)
    peft_cfg = os.path.join(directory, "adapter_config.json")
    if os.path.isfile(peft_cfg):
        f = Fields(read_json(peft_cfg), peft_cfg, error=MethodError)
        ptype = f.str("peft_type", "LORA", choices=PEFT_TYPES)
        return PEFT_TYPES[ptype].from_peft(model, directory, trainable=trainable)
    raise MethodError(f"lorart: {directory}: holds neither {METHOD_FILE} nor a PEFT adapter_config.json")


def storage_bytes(directory: str) -> int:
    """Bytes on disk of a saved method folder."""
    return dir_size(directory)


__all__ = ["METHODS", "Method", "MethodError", "prepare", "load", "storage_bytes", "method_class",
           "FullMethod", "LoRAMethod", "QLoRAMethod", "AdapterMethod", "PrefixMethod", "PromptMethod",
           "BitFitMethod", "FullConfig", "LoRAConfig", "QLoRAConfig", "AdapterConfig", "PrefixConfig",
           "PromptConfig", "BitFitConfig"]
