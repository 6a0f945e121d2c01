"""What a run starts from: the device and dtype, the base model and tokenizer, the method attached to it, the data."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .._core import cuda_usable
from ..data import default_dataset_paths, load_examples, pack_examples, split_examples
from ..methods import Method, method_class, prepare
from ..methods.base import make_config
from ..models import LlamaForCausalLM, Tokenizer, apply_linear_factory, base_model_id, load_model
from ..models.loading import as_dtype
from ..sysinfo import check_gpu
from .options import DEFAULT_FORMAT_REGEX, TrainOptions


def resolve_device(device) -> torch.device:
    """The torch.device a run or a command uses ("auto": the GPU when lorart's kernels can use it). A GPU whose
    architecture the kernels were not compiled for is refused here, at the start (sysinfo.check_gpu), instead of
    failing at its first kernel launch."""
    if device is None or device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() and cuda_usable() else "cpu")
        if dev.type == "cuda":
            check_gpu(dev)
        return dev
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"lorart.train: argument `device`: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"lorart.train: argument `device`: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("lorart.train: argument `device`: 'cuda' was asked for but torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"lorart.train: argument `device`: {device!r}: torch sees {torch.cuda.device_count()} CUDA "
                         f"GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "cuda":
        check_gpu(dev)
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype when none is asked for: float32 on the CPU; bfloat16 on a GPU that computes in it (sm_80
    and later), else float16 (a T4 or V100: training then uses loss scaling, precision.py)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def resolve_dtype(opts: TrainOptions, device: torch.device, keeps_dtypes: bool = False) -> torch.dtype:
    """opts.dtype, or the training default: default_dtype, but bf16 on CPUs that compute bf16 natively (AVX512-BF16,
    AMX, Arm BF16: the frozen base in bf16, steps under torch.autocast, float32 masters; float32 elsewhere, where
    torch emulates bf16 matmuls far slower); float32 instead of a default float16 for a method that keeps its
    trainable tensors in the layers' dtype (`keeps_dtypes`: float16 loss scaling cannot unscale them)."""
    if opts.dtype is None:
        if device.type == "cpu" and cpu_native_bf16():
            return torch.bfloat16
        dtype = default_dtype(device)
        return torch.float32 if dtype == torch.float16 and keeps_dtypes else dtype
    return as_dtype(opts.dtype)


def cpu_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (lorart.sysinfo.cpu_info); LORART_CPU_BF16=0 or 1 overrides it."""
    env = os.environ.get("LORART_CPU_BF16", "")
    if env in ("0", "1"):
        return env == "1"
    from ..sysinfo import cpu_info

    return bool(cpu_info()["native_bf16"])


def as_lorart_tokenizer(tok):
    """A lorart Tokenizer from a lorart one or a transformers fast tokenizer (same vocabulary and template)."""
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
class Base:
    """The base model a run fine-tunes, before a method is attached."""
    model: nn.Module
    tokenizer: Tokenizer
    name: Optional[str]      # the path or name given (recorded in the artifacts), None for an unnamed module
    is_lorart: bool          # lorart's LlamaForCausalLM (chunked loss, packing, lorart.models.generate)


def load_base(model, tokenizer, opts: TrainOptions, device: torch.device, dtype: torch.dtype,
              linear_factory=None) -> Base:
    """Load `model` (None/"default", a path) with `linear_factory` (QLoRA: NF4 while reading), or adopt a
    loaded nn.Module (moved to `device`, cast to `dtype` on CUDA or when `opts.dtype` is set); frozen."""
    if model is None or isinstance(model, (str, os.PathLike)):
        name = "default" if model is None else os.fspath(model)
        m, tok = load_model(None if name == "default" else name, dtype=dtype, device=device,
                            linear_factory=linear_factory)
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
    tok = as_lorart_tokenizer(tokenizer if tokenizer is not None else tok)
    if tok is None:
        raise ValueError("lorart.train: argument `tokenizer`: the model came without a tokenizer "
                         "(no tokenizer.json in its folder); pass tokenizer=")
    if tok.eos_id is None:
        raise ValueError("lorart.train: argument `tokenizer`: the tokenizer has no EOS token")
    for p in m.parameters():
        p.requires_grad_(False)
    return Base(m, tok, name, isinstance(m, LlamaForCausalLM))


def method_config(opts: TrainOptions, cls: type[Method]) -> dict:
    """The method's options of this run: the TrainOptions fields it takes (`cls.train_options`: r, alpha,
    dropout, targets, rslora for lora and qlora), then `method_options` (which may override them)."""
    return {**{k: getattr(opts, k) for k in cls.train_options}, **(opts.method_options or {})}


def attach_method(base: Base, cls: type[Method], config, opts: TrainOptions) -> Method:
    """Attach the method (its initialisation seeded by `opts.seed`), make its weights float32 masters unless
    it keeps dtypes, turn on gradient checkpointing if asked."""
    m = base.model
    torch.manual_seed(opts.seed)  # LoRA A / adapter / prompt init
    try:
        method = prepare(m, cls.name, config, tokenizer=base.tokenizer)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e).replace("lorart: inject:", "lorart.train:")) from None
    method.use_float32_masters()
    if opts.gradient_checkpointing:
        enable = getattr(m, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(f"lorart.train: argument `gradient_checkpointing`: {type(m).__name__} has no "
                             "gradient_checkpointing_enable()")
        if base.is_lorart:
            enable()
        else:
            try:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            except TypeError:
                enable()
    method.base_model_name = base_model_id(base.name) if base.name is not None else None  # resolvable
    return method


def random_model_with_method(config, opts: TrainOptions, dtype: torch.dtype = torch.float32) -> tuple:
    """(model, method): a lorart Llama of `config` (a LlamaConfig) with random weights and `opts.method` attached
    as lorart.train attaches it (the method's base factory, e.g. QLoRA's NF4; frozen; attach_method). For the
    planner's measurements and tests: the caller seeds the weights."""
    cls = method_class(opts.method)
    mc = make_config(cls, method_config(opts, cls))
    model = LlamaForCausalLM(config).to(dtype)
    factory = cls.base_linear_factory(mc, dtype)
    if factory is not None:
        apply_linear_factory(model, factory)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, attach_method(Base(model, None, None, True), cls, mc, opts)


@dataclass
class Data:
    train: list
    eval: list
    general: list
    train_path: str
    eval_path: Optional[str]
    general_path: Optional[str]
    is_default: bool
    files: list = field(default_factory=list)  # per source: path, container, format, counts (and role)


def _load(src, tokenizer, max_seq_len: int, what: str, files: list) -> list:
    """Examples of `src` (lorart.data.load_examples); the sources' descriptions are appended to `files`."""
    try:
        loaded = load_examples(src, tokenizer, max_seq_len, what=what)
    except TypeError as e:
        raise TypeError(f"lorart.train: {e}") from None
    files += [dict(d, role=what) for d in loaded.describe()]
    return loaded.examples


def _source(src) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<records>"


def load_data(data, eval_data, tokenizer, opts: TrainOptions, general_data=True) -> Data:
    is_default = data is None or data == "default"
    files: list = []
    paths = default_dataset_paths() if (is_default or general_data is True) else {}
    if is_default:
        data = paths["train"]
        if eval_data is None:
            eval_data = paths["heldout"]
    train = _load(data, tokenizer, opts.max_seq_len, "data", files)
    train_path = _source(data)
    if eval_data is not None:
        ev = _load(eval_data, tokenizer, opts.max_seq_len, "eval_data", files)
        eval_path = _source(eval_data)
    elif opts.eval_fraction > 0 and len(train) >= 2:
        train, ev = split_examples(train, opts.eval_fraction, seed=opts.seed)
        eval_path = f"{opts.eval_fraction:g} of {train_path}"
    else:
        ev, eval_path = [], None
    if general_data is True:
        general_data = paths["general"]
    general, general_path = [], None
    if general_data not in (False, None):
        general = _load(general_data, tokenizer, opts.max_seq_len, "general_data", files)
        general_path = _source(general_data)
    if opts.packing:
        train = pack_examples(train, opts.max_seq_len)
    return Data(train, ev, general, train_path, eval_path, general_path, is_default, files)


def format_regex_for(opts: TrainOptions, data: Data) -> Optional[str]:
    if opts.format_regex is not None:
        return opts.format_regex
    return DEFAULT_FORMAT_REGEX if data.is_default else None
