"""Resolve the device, load (or adopt) the model and tokenizer, add LoRA / QLoRA, load the data."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .options import DEFAULT_FORMAT_REGEX, TrainOptions


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        import lorart
        if torch.cuda.is_available() and lorart.cuda_usable():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"lorart.train: argument `device`: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"lorart.train: argument `device`: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("lorart.train: argument `device`: 'cuda' was asked for but torch sees no CUDA GPU")
    return dev


def resolve_dtype(opts: TrainOptions, device: torch.device) -> torch.dtype:
    if opts.dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from ..models.loading import _as_dtype
    return _as_dtype(opts.dtype)


def as_lorart_tokenizer(tok):
    """A lorart Tokenizer from a lorart one or a transformers fast tokenizer (same vocabulary and template)."""
    from ..models.tokenizer import Tokenizer
    if tok is None or isinstance(tok, Tokenizer):
        return tok
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"lorart.train: argument `tokenizer`: expected a lorart Tokenizer or a transformers fast "
                        f"tokenizer, got {type(tok).__name__}")
    probe = tok("a").input_ids if callable(tok) else []
    add_bos = bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id
    return Tokenizer(backend, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                     chat_template=getattr(tok, "chat_template", None), add_bos_token=add_bos)


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    model_name: Optional[str]
    is_lorart: bool
    method: object = None   # the lorart.methods.Method attached to `model`


def _nf4_factory(dtype: torch.dtype):
    from ..nn.nf4_linear import NF4Linear

    def factory(name, linear):
        return NF4Linear.from_linear(linear, compute_dtype=dtype)
    return factory


def method_config(opts: TrainOptions) -> dict:
    """The lorart.methods options of this run: r/alpha/dropout/targets/rslora for lora and qlora, then
    `method_options` (which may override them)."""
    cfg = {}
    if opts.method in ("lora", "qlora"):
        cfg = {"targets": opts.targets, "r": opts.r, "alpha": opts.alpha, "dropout": opts.dropout,
               "rslora": opts.rslora}
    return {**cfg, **(opts.method_options or {})}


def load_and_prepare(model, tokenizer, opts: TrainOptions, device: torch.device, dtype: torch.dtype) -> Loaded:
    """Load the model (streamed through NF4 for qlora), move it, attach the method (lorart.methods.prepare);
    trainable weights stay float32."""
    from .. import methods
    from ..models import LlamaForCausalLM, load_model

    name = None
    if model is None or isinstance(model, (str, os.PathLike)):
        name = "default" if model is None else os.fspath(model)
        factory = _nf4_factory(dtype) if opts.method == "qlora" else None
        m, tok = load_model(None if name == "default" else name, dtype=dtype, device=device, linear_factory=factory)
    elif isinstance(model, nn.Module):
        m, tok = model, tokenizer
        m.to(device)
        if opts.dtype is not None or device.type == "cuda":
            m.to(dtype)
        cfg = getattr(m, "config", None)
        name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None
    else:
        raise TypeError(f"lorart.train: argument `model`: expected None, 'default', a path or an nn.Module, "
                        f"got {type(model).__name__}")
    if tokenizer is not None:
        tok = tokenizer
    tok = as_lorart_tokenizer(tok)
    if tok is None:
        raise ValueError("lorart.train: argument `tokenizer`: the model came without a tokenizer "
                         "(no tokenizer.json in its folder); pass tokenizer=")
    if tok.eos_id is None:
        raise ValueError("lorart.train: argument `tokenizer`: the tokenizer has no EOS token")
    for p in m.parameters():
        p.requires_grad_(False)
    torch.manual_seed(opts.seed)  # LoRA A / adapter / prompt init
    try:
        method = methods.prepare(m, opts.method, method_config(opts), tokenizer=tok)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e).replace("lorart: inject:", "lorart.train:")) from None
    for p in m.parameters():
        # fp32 master weights (LoRALinear, adapters, prompts and prefixes cast to the compute dtype); BitFit's
        # biases stay in the dtype of their linear layer, which adds them natively
        if p.requires_grad and p.dtype != torch.float32 and opts.method != "bitfit":
            p.data = p.data.float()
    if opts.gradient_checkpointing:
        enable = getattr(m, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(f"lorart.train: argument `gradient_checkpointing`: {type(m).__name__} has no "
                             "gradient_checkpointing_enable()")
        if isinstance(m, LlamaForCausalLM):
            enable()
        else:
            try:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            except TypeError:
                enable()
    from ..models import base_model_id
    method.base_model_name = base_model_id(name) if name is not None else None   # resolvable, not "default"
    return Loaded(m, tok, name, isinstance(m, LlamaForCausalLM), method)


@dataclass
class Data:
    train: list
    eval: list
    general: list
    train_path: str
    eval_path: Optional[str]
    is_default: bool
    files: list = field(default_factory=list)  # per source: path, container, format, counts (and role)


def _load(src, tokenizer, max_seq_len: int, what: str, files: Optional[list] = None) -> list:
    """Examples of `src` (lorart.data.load_examples); the sources' descriptions are appended to `files`."""
    from ..data import load_examples
    try:
        loaded = load_examples(src, tokenizer, max_seq_len, what=what)
    except TypeError as e:
        raise TypeError(f"lorart.train: {e}") from None
    if files is not None:
        files += [dict(d, role=what) for d in loaded.describe()]
    return loaded.examples


def load_data(data, eval_data, tokenizer, opts: TrainOptions, general_data=True) -> Data:
    from ..data import default_dataset_paths, split_examples
    is_default = data is None or data == "default"
    files = []
    paths = default_dataset_paths() if (is_default or general_data is True) else {}
    if is_default:
        train = _load(paths["train"], tokenizer, opts.max_seq_len, "data", files)
        train_path = paths["train"]
        if eval_data is None:
            eval_data = paths["heldout"]
    else:
        train = _load(data, tokenizer, opts.max_seq_len, "data", files)
        train_path = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<records>"
    if eval_data is not None:
        ev = _load(eval_data, tokenizer, opts.max_seq_len, "eval_data", files)
        eval_path = os.fspath(eval_data) if isinstance(eval_data, (str, os.PathLike)) else "<records>"
    elif opts.eval_fraction > 0 and len(train) >= 2:
        train, ev = split_examples(train, opts.eval_fraction, seed=opts.seed)
        eval_path = f"{opts.eval_fraction:g} of {train_path}"
    else:
        ev, eval_path = [], None
    if general_data is True:
        general = _load(paths["general"], tokenizer, opts.max_seq_len, "general_data", files)
    elif general_data in (False, None):
        general = []
    else:
        general = _load(general_data, tokenizer, opts.max_seq_len, "general_data", files)
    if opts.packing:
        from ..data import pack_examples
        train = pack_examples(train, opts.max_seq_len)
    return Data(train, ev, general, train_path, eval_path, is_default, files)


def format_regex_for(opts: TrainOptions, data: Data) -> Optional[str]:
    if opts.format_regex is not None:
        return opts.format_regex
    return DEFAULT_FORMAT_REGEX if data.is_default else None
