"""The interface every fine-tuning method implements, and the artifact folder it writes.

An artifact folder holds `lorart_method.json` (method name, its config, the base model's shape) and one
weights file: PEFT's `adapter_model.safetensors` + `adapter_config.json` where PEFT has the method (lora,
qlora, prompt, prefix), else `weights.safetensors` (adapter, bitfit) or `model.safetensors` (full).
Writes are atomic: a temporary folder beside the target, then a rename.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from .._atomic import atomic_dir
from ..errors import FileFormatError, InputError
from ..fileformats import METHOD_FILE, Fields, read_method_file
from ..fileformats import METHOD_FORMAT_VERSION as FORMAT_VERSION
from ..fileformats import read_json as strict_read_json
from ..fileformats import read_safetensors as strict_read_safetensors
from ..nn.lora import nf4_weight_of

WEIGHTS_FILE = "weights.safetensors"


class MethodError(FileFormatError):
    """A bad method configuration or artifact; the message names the argument or the file."""


def base_param_count(model: nn.Module) -> int:
    """Parameters of the model as the literature counts them (tied weights once, NF4 weights by element)."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(int(torch.Size(w.shape).numel()) for m in model.modules()
                   if (w := nf4_weight_of(m)) is not None and not isinstance(w, nn.Parameter))


def model_shape(model: nn.Module) -> dict:
    c = model.config
    return {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size}


def dir_size(directory: str) -> int:
    """Bytes of the files in an artifact folder."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if os.path.isfile(os.path.join(directory, f)))


def write_json(path: str, obj: Any) -> None:
    """Strict JSON (a NaN / Infinity in a config is refused with ValueError, never written bare)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    with open(path, "w") as f:
        f.write(text + "\n")


def read_json(path: str) -> dict:
    """A JSON object file, read strictly (lorart.fileformats)."""
    return strict_read_json(path, MethodError)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an artifact's weights file: float32/bfloat16/float16 and finite, or MethodError."""
    if not os.path.isfile(path):
        pick = [f for f in ("adapter_model.bin", "pytorch_model.bin") if os.path.exists(
            os.path.join(os.path.dirname(path), f))]
        why = f"; found {pick[0]}, a pickle, which lorart never loads" if pick else ""
        raise MethodError(f"lorart: {path}: missing{why}")
    return strict_read_safetensors(path, MethodError)


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise InputError(f"lorart: refusing to write the {what}: `{k}` holds NaN or infinite values (did the "
                             "training diverge?)")


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def expect_tensor(tensors: dict, key: str, shape: tuple, path: str) -> torch.Tensor:
    if key not in tensors:
        raise MethodError(f"lorart: {path}: key `{key}` is missing")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise MethodError(f"lorart: {path}: key `{key}`: expected shape {list(shape)}, got {list(t.shape)}")
    return t


class Method:
    """A fine-tuning method attached to a model. Subclasses set `name`, `Config` (a dataclass) and implement
    `_attach` (create and register the trainable tensors, freeze the rest), `state_dict`/`_load_tensors`
    and `_write` / `_read` of the weights file.

    - `trainable_parameters()`: the parameters the optimizer should update (all require grad).
    - `save(dir)`: writes only what the method trained; returns the folder. `storage_bytes(dir)`.
    - `Method.load(model, dir)` (or `lorart.methods.load`): attaches the saved method to a base model.
    - `merge()`/`unmerge()`: fold the method into the base weights where it can (returns False if it cannot).
    - `remove()`: detach the method, restoring the base model's function.

    What a training run asks of a method, each class answers (lorart.train and lorart.compare never compare
    method names): `base_linear_factory` (is the base quantized while it loads?), `train_options` (which
    lorart.train options configure it), `keeps_dtypes` (do its weights stay in their layer's dtype rather than
    float32 masters?), `starts_as_base` (is the model unchanged before training?), `default_lr`,
    `saves_whole_model` (does `save` read every weight? a sharded run gathers them for it).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    weights_file: ClassVar[str] = WEIGHTS_FILE
    optimizer: ClassVar[str] = "adamw"   # the optimizer the literature uses with it; "paged_adamw" for full
    default_lr: ClassVar[float] = 1e-3   # a learning rate in the literature's range, for a few dozen steps
    train_options: ClassVar[tuple] = ()  # TrainOptions fields that are options of this method (r, alpha, ...)
    keeps_dtypes: ClassVar[bool] = False  # True: trainable tensors keep the dtype of the layer they live in
    starts_as_base: ClassVar[bool] = True  # the model computes exactly the base model's function before training
    saves_whole_model: ClassVar[bool] = False  # True: the artifact holds every weight (not only the trained ones)
    base_model_name: str | None = None   # recorded in the artifact's metadata (and PEFT's config)

    def __init__(self, model: nn.Module, config, init: bool = True):
        self.model = model
        self.config = config
        self.init = init  # False when loading: skip data-dependent initialisation, the file overwrites it
        self.base_params = base_param_count(model)
        was_training = model.training
        self._attach()
        model.train(was_training)   # new modules follow the model's train/eval mode

    # -- to implement -------------------------------------------------------------------------------------
    def _attach(self) -> None:
        raise NotImplementedError

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the artifact stores (detached)."""
        return {k: p.detach() for k, p in self.named_trainable_parameters().items()}

    def _write(self, folder: str) -> None:
        save_tensors(os.path.join(folder, self.weights_file), self.state_dict())

    def _read(self, folder: str) -> None:
        path = os.path.join(folder, self.weights_file)
        tensors = read_safetensors(path)
        mine = self._loadable()
        extra = sorted(set(tensors) - set(mine))
        if extra:
            raise MethodError(f"lorart: {path}: key `{extra[0]}` does not belong to this {self.name} method "
                              f"(expected keys like `{next(iter(mine))}`)")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(expect_tensor(tensors, k, tuple(p.shape), path).to(p.dtype))

    def _loadable(self) -> dict[str, torch.Tensor]:
        """Artifact key -> the tensor of this model it is copied into (defaults to the trainable parameters)."""
        return self.named_trainable_parameters()

    # -- shared -------------------------------------------------------------------------------------------
    @classmethod
    def base_linear_factory(cls, config, dtype: torch.dtype):
        """The `linear_factory` of lorart.models.load_model for this method's base model, or None (plain
        nn.Linear). QLoRA quantizes each linear layer to NF4 as soon as its weight is read."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def use_float32_masters(self) -> None:
        """Make the trainable tensors float32 master weights (the modules cast them to the compute dtype),
        unless the method `keeps_dtypes` (BitFit's biases are added by their linear layer, in its dtype)."""
        if self.keeps_dtypes:
            return
        for p in self.trainable_parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def report(self) -> dict:
        n = sum(p.numel() for p in self.trainable_parameters())
        return {"method": self.name, "trainable_params": n, "base_params": self.base_params,
                "trainable_percent": 100.0 * n / self.base_params if self.base_params else 0.0}

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def save(self, directory: str) -> str:
        """Write the artifact atomically; a non-finite trainable tensor is refused (nothing is written): lorart
        never writes a file its own loaders would refuse."""
        refuse_non_finite(self.state_dict(), f"{self.name} artifact {directory}")
        meta = {"format_version": FORMAT_VERSION, "method": self.name, "config": self.config_dict(),
                "base_model": model_shape(self.model), "base_model_name_or_path": self.base_model_name}
        with atomic_dir(directory) as tmp:
            self._write(tmp)
            write_json(os.path.join(tmp, METHOD_FILE), meta)
        return os.path.abspath(directory)

    @staticmethod
    def storage_bytes(directory: str) -> int:
        return dir_size(directory)

    @classmethod
    def load(cls, model: nn.Module, directory: str, trainable: bool = False) -> "Method":
        """Attach the method saved in `directory` to `model` (a base model of the same shape)."""
        meta = read_method_file(directory, MethodError)
        if meta is None:
            raise MethodError(f"lorart: {os.path.join(directory, METHOD_FILE)}: missing")
        if meta["method"] != cls.name:
            raise MethodError(f"lorart: {meta['path']}: key `method`: expected {cls.name!r}, got {meta['method']!r}")
        check_shape(model, meta["base_model"], meta["path"])
        method = cls._from_folder(model, directory, make_config(cls, meta["config"], where=meta["path"]))
        for p in method.trainable_parameters():
            p.requires_grad_(trainable)
        return method

    @classmethod
    def _from_folder(cls, model: nn.Module, directory: str, config) -> "Method":
        """Attach the method with `config` and read its weights file (what `load` does after the checks)."""
        method = cls(model, config, init=False)
        method._read(directory)
        return method

    def merge(self) -> bool:
        return False

    def unmerge(self) -> None:
        pass

    def remove(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        r = self.report()
        return (f"{type(self).__name__}({self.config}, trainable={r['trainable_params']:,} "
                f"({r['trainable_percent']:.4f}%))")


def check_shape(model: nn.Module, saved: dict | None, where: str) -> None:
    if not saved:
        return
    have = model_shape(model)
    for k, v in saved.items():
        if k in have and have[k] != v:
            raise MethodError(f"lorart: {where}: key `base_model.{k}`: the artifact was trained on a model with "
                              f"{k}={v}, this model has {have[k]}")


def make_config(cls: type, cfg, where: str | None = None, prefix: str = "config.", **kw):
    """Build `cls.Config` from a dict / Config instance / None plus keyword overrides; unknown keys and values of
    the wrong type raise (an int field takes an int, not 16.5 or "16"; a bool field a bool). `where` names the
    file the dict came from, `prefix` the dict's place in it."""
    if cfg is None:
        cfg = {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        if not isinstance(cfg, cls.Config):
            raise MethodError(f"lorart: method {cls.name!r}: argument `cfg`: expected a {cls.Config.__name__} or a "
                              f"dict, got a {type(cfg).__name__}")
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, dict):
        raise MethodError(f"lorart: method {cls.name!r}: argument `cfg`: expected a dict, got {type(cfg).__name__}")
    merged = {**cfg, **kw}
    hints = typing.get_type_hints(cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(merged) - fields)
    if unknown:
        at = f"lorart: {where}: key `{prefix}{unknown[0]}`" if where else \
            f"lorart: method {cls.name!r}: unknown option `{unknown[0]}`"
        raise MethodError(f"{at}: not an option of method {cls.name!r}; valid options: {', '.join(sorted(fields))}")
    for k, v in list(merged.items()):
        merged[k] = _typed(cls, k, v, hints[k], where, prefix)
    return cls.Config(**merged)


def _typed(cls: type, key: str, v, hint, where: str | None, prefix: str = "config."):
    """`v` checked against the Config field's type (lists become tuples)."""
    f = Fields({key: v}, where, prefix, MethodError) if where else \
        Fields({key: v}, f"method {cls.name!r}", error=MethodError, noun="option")
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if v is None:
        if not optional:
            f.fail(key, f"a value of type {getattr(base, '__name__', base)}", None)
        return None
    if base is bool:
        return f.bool(key)
    if base is int:
        return f.int(key)
    if base is float:
        return float(f.number(key))
    if base is str:
        return f.str(key)
    if base is tuple:
        if isinstance(v, str):      # targets: a regex or "all-linear"
            return v
        if not isinstance(v, (list, tuple)) or not all(
                isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in v):
            f.fail(key, "a list of strings or integers, or a string", v)
        return tuple(v)
    return v
