"""What a plan is about: the model config, the options, and the model the method would train, built on the
`meta` device (no memory, no weights) with the real lorart.methods classes attached.

The meta model mirrors `lorart.train`'s setup (lorart.training.setup.load_and_prepare): weights in the run's
dtype, every decoder linear in NF4 for qlora, the method attached by its own class, trainable parameters in
float32 (BitFit's biases stay in the dtype of their layer). Counting its parameters and buffers gives the exact
trainable-parameter count, base storage and artifact tensors of the run, for any method and option.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_CONFIG = "smollm2-135m"
PLAN_ONLY = ("device", "optimizer_state_bits", "paged", "fsdp", "memory", "gemm_tflops")


class PlanError(ValueError):
    """A bad plan argument; the message names it."""


def bundled_configs() -> dict[str, str]:
    """Name -> path of the config.json files shipped with lorart (architecture only, no weights)."""
    return {f[:-5]: os.path.join(CONFIG_DIR, f) for f in sorted(os.listdir(CONFIG_DIR)) if f.endswith(".json")}


def _read_config_json(path: str, what: str):
    from ..models import LlamaConfig

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise PlanError(f"lorart.plan: argument `model`: cannot read {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise PlanError(f"lorart.plan: argument `model`: {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise PlanError(f"lorart.plan: argument `model`: {path}: expected a JSON object (a config.json)")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    try:
        return LlamaConfig.from_hf_dict(d)
    except (ValueError, TypeError, KeyError) as e:
        raise PlanError(f"lorart.plan: argument `model`: {path} ({what}) is not a supported Llama-family "
                        f"config: {e}") from None


def resolve_config(model) -> tuple:
    """(LlamaConfig, label) from None/"default", a bundled name, a config.json, an HF folder, a .gguf file, a
    dict or a LlamaConfig."""
    from ..models import LlamaConfig

    if isinstance(model, LlamaConfig):
        return model, "config"
    if isinstance(model, dict):
        try:
            return LlamaConfig.from_hf_dict({k: v for k, v in model.items() if not k.startswith("_")}), "config"
        except (ValueError, TypeError, KeyError) as e:
            raise PlanError(f"lorart.plan: argument `model`: not a supported Llama-family config: {e}") from None
    if model is None or model == "default":
        return _read_config_json(bundled_configs()[DEFAULT_CONFIG], "bundled"), DEFAULT_CONFIG
    if not isinstance(model, (str, os.PathLike)):
        raise PlanError(f"lorart.plan: argument `model`: expected a path, a bundled name or a config dict, got "
                        f"{type(model).__name__}")
    path = os.fspath(model)
    bundled = bundled_configs()
    if path in bundled:
        return _read_config_json(bundled[path], "bundled"), path
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise PlanError(f"lorart.plan: argument `model`: {path} is a folder without config.json")
        return _read_config_json(cfg, "model folder"), path
    if os.path.isfile(path) and path.endswith(".gguf"):
        from ..models.gguf_import import GGUFFile, gguf_config
        try:
            return gguf_config(GGUFFile(path)), path
        except (ValueError, KeyError, OSError) as e:
            msg = str(e) if path in str(e) else f"{path}: {e}"
            raise PlanError(f"lorart.plan: argument `model`: {msg}") from None
    if os.path.isfile(path):
        return _read_config_json(path, "config file"), path
    raise PlanError(f"lorart.plan: argument `model`: {path!r} is neither a file, a folder nor a bundled config "
                    f"({', '.join(bundled)})")


def parse_bytes(s) -> int:
    """'24GB', '24GiB', '48G', '1.5T', '512MB', or a number of bytes -> bytes. GB and GiB both mean 2**30, as
    GPU memory is labelled (an "80GB" H100 and a "48GB" A6000 have 80 and 48 GiB); use TB/GB/MB/KB the same way."""
    if isinstance(s, bool):
        raise PlanError(f"lorart.plan: argument `memory`: expected a size such as 24GB or 80GiB, got {s!r}")
    if isinstance(s, (int, float)):
        if not s > 0:
            raise PlanError(f"lorart.plan: argument `memory`: expected a size > 0, got {s!r}")
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(s), re.IGNORECASE)
    if not m or not float(m.group(1)) > 0 or (m.group(3) and not m.group(2)):
        raise PlanError(f"lorart.plan: argument `memory`: expected a size such as 24GB, 80GiB or 48G, got {s!r}")
    power = "_kmgt".index(m.group(2).lower()) if m.group(2) else 0
    return int(float(m.group(1)) * 1024 ** power)


@dataclass
class PlanOptions:
    """lorart.train's options that change memory or time (validated by TrainOptions), plus the plan's own."""
    train: object                         # lorart.training.TrainOptions
    device: str = "cpu"                    # "cpu" | "cuda": the device the plan is for
    optimizer_state_bits: int = 32
    paged: bool = False
    fsdp: int = 1
    memory: Optional[int] = None          # bytes available on the device (fit advice)
    gemm_tflops: Optional[float] = None   # override of the measured GEMM rate

    @property
    def dtype(self) -> torch.dtype:
        from ..training.setup import resolve_dtype
        return resolve_dtype(self.train, torch.device(self.device))

    @property
    def autocast(self) -> bool:
        """Whether lorart.train runs this step under torch.autocast (its own rule: training.evaluate.autocast_ctx)."""
        import contextlib

        from ..training.evaluate import autocast_ctx
        return not isinstance(autocast_ctx(torch.device(self.device), self.dtype), contextlib.nullcontext)


def make_options(method: str = "lora", *, device: str = "auto", optimizer_state_bits: int = 32,
                 paged: bool = False, fsdp: int = 1, memory=None, gemm_tflops=None, **train_options) -> PlanOptions:
    from ..training.options import TrainOptions, option_names

    unknown = sorted(set(train_options) - set(option_names()))
    if unknown:
        raise PlanError(f"lorart.plan: unknown argument(s) {', '.join(map(repr, unknown))}; expected one of "
                        f"{', '.join(option_names() + list(PLAN_ONLY))}")
    try:
        train = TrainOptions(method=method, **train_options).validate()
    except (ValueError, TypeError) as e:
        raise PlanError(str(e).replace("lorart.train:", "lorart.plan:")) from None
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise PlanError(f"lorart.plan: argument `device`: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if optimizer_state_bits not in (8, 32) or isinstance(optimizer_state_bits, bool):
        raise PlanError(f"lorart.plan: argument `optimizer_state_bits`: expected 8 or 32, got {optimizer_state_bits!r}")
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1:
        raise PlanError(f"lorart.plan: argument `fsdp`: expected an int >= 1 (GPUs to shard over), got {fsdp!r}")
    if gemm_tflops is not None and (isinstance(gemm_tflops, bool) or not isinstance(gemm_tflops, (int, float))
                                    or not gemm_tflops > 0):
        raise PlanError(f"lorart.plan: argument `gemm_tflops`: expected a number > 0, got {gemm_tflops!r}")
    return PlanOptions(train=train, device=device.split(":")[0], optimizer_state_bits=optimizer_state_bits,
                       paged=bool(paged), fsdp=fsdp, memory=None if memory is None else parse_bytes(memory),
                       gemm_tflops=None if gemm_tflops is None else float(gemm_tflops))


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """A tensor of the run by name: elements and bytes per element."""
    name: str
    numel: int
    itemsize: int
    trainable: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class Setup:
    """The meta model with the method attached, and what the plan reads off it."""
    config: object
    label: str
    opts: PlanOptions
    model: nn.Module
    method: object                                  # the lorart.methods.Method attached
    params: list = field(default_factory=list)      # Entry per parameter (tied ones once)
    buffers: list = field(default_factory=list)     # Entry per buffer that holds model state (NF4 storage)
    nf4_linears: list = field(default_factory=list)  # (path, rows, cols) of the NF4 layers

    @property
    def trainable(self) -> list:
        return [p for p in self.params if p.trainable]

    @property
    def frozen(self) -> list:
        return [p for p in self.params if not p.trainable]


def _meta_nf4(linear: nn.Linear, blocksize: int, double_quant: bool, compute_dtype: torch.dtype):
    """An NF4Linear with meta buffers of the exact shapes and dtypes NF4Linear.from_linear would make."""
    from ..nf4 import NF4Weight
    from ..nn.nf4_linear import NF4Linear

    rows, cols = linear.out_features, linear.in_features
    n = rows * cols
    nb = -(-n // blocksize)
    dev = torch.device("meta")
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=dev)
    if double_quant:
        absmax = torch.empty(nb, dtype=torch.uint8, device=dev)
        nested = torch.empty(-(-nb // 256), dtype=torch.float32, device=dev)
        code = torch.empty(256, dtype=torch.float32, device=dev)
    else:
        absmax, nested, code = torch.empty(nb, dtype=torch.float32, device=dev), None, None
    w = NF4Weight(packed, absmax, nested, code, 0.0, blocksize, (rows, cols), compute_dtype)
    return NF4Linear(w, None if linear.bias is None else linear.bias, compute_dtype=compute_dtype)


def build(model, opts: PlanOptions) -> Setup:
    """Build the meta model of the run and attach its method (lorart.methods' own classes)."""
    from ..methods import METHODS, MethodError
    from ..methods.base import make_config
    from ..models import LlamaForCausalLM, apply_linear_factory
    from ..training.setup import method_config

    config, label = resolve_config(model)
    dtype = opts.dtype
    with torch.device("meta"):
        m = LlamaForCausalLM(config)
    m.to(dtype)
    cls = METHODS[opts.train.method]
    try:
        cfg = make_config(cls, method_config(opts.train, cls))
    except (ValueError, TypeError) as e:
        raise PlanError(str(e).replace("lorart:", "lorart.plan:", 1)) from None
    if cls.base_linear_factory(cfg, dtype) is not None:
        # the method quantizes the base while it loads (QLoRA: every decoder linear to NF4; lm_head stays
        # dense); on the meta device the NF4 layers get buffers of the exact shapes instead of real codes
        apply_linear_factory(m, lambda path, lin: _meta_nf4(lin, cfg.blocksize, cfg.double_quant, dtype))
    for p in m.parameters():
        p.requires_grad_(False)
    # prefix tuning's default init runs the model on real tokens (data-dependent): skip it, same tensors
    init = not (cls.name == "prefix" and not getattr(cfg, "projection", False))
    try:
        method = cls(m, cfg, init=init)
    except MethodError as e:
        raise PlanError(str(e).replace("lorart:", "lorart.plan:", 1)) from None
    method.use_float32_masters()
    if opts.train.gradient_checkpointing:
        m.gradient_checkpointing_enable()
    return _inventory(Setup(config, label, opts, m, method))


def setup_from_model(model: nn.Module, method, opts: PlanOptions) -> Setup:
    """A Setup over a live model that already has its method attached (lorart.train's run)."""
    from ..models import LlamaForCausalLM
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"the plan models lorart's LlamaForCausalLM, not {type(model).__name__}")
    return _inventory(Setup(model.config, "model", opts, model, method))


def _inventory(s: Setup) -> Setup:
    from ..nn.nf4_linear import NF4Linear
    m = s.model
    seen = set()
    for name, p in m.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        s.params.append(Entry(name, p.numel(), p.element_size(), p.requires_grad))
    for name, b in m.named_buffers():
        if "_nf4_" in name:
            s.buffers.append(Entry(name, b.numel(), b.element_size()))
    for name, mod in m.named_modules():
        if isinstance(mod, NF4Linear):
            s.nf4_linears.append((name, mod.out_features, mod.in_features))
    return s


def artifact_tensors(setup: Setup) -> dict:
    """name -> (shape, itemsize) of the tensors the method's artifact file stores (its own state_dict())."""
    try:
        tensors = setup.method.state_dict()
    except NotImplementedError:   # a state_dict() that copies to the CPU (LoRA): the same tensors, by name
        tensors = setup.method.named_trainable_parameters()
    return {k: (tuple(v.shape), v.element_size()) for k, v in tensors.items()}


def options_dict(opts: PlanOptions) -> dict:
    t = opts.train
    d = {k: getattr(t, k) for k in ("method", "method_options", "r", "alpha", "targets", "batch_size",
                                    "max_seq_len", "grad_accum", "gradient_checkpointing", "dtype")}
    d["targets"] = d["targets"] if isinstance(d["targets"], str) else list(d["targets"])
    d.update({f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "train"})
    d["dtype"] = str(opts.dtype).replace("torch.", "")
    return d
