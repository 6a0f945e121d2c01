"""Put LoRA / QLoRA adapters into any torch model and manage them model-wide.

    report = lorart.inject(model, targets=["q_proj", "v_proj"], r=16, alpha=32, dropout=0.05)
    report = lorart.inject(model, targets="all-linear", quantize="nf4")       # QLoRA
    print(lorart.trainable_report(model))
    with lorart.adapter_ids(model, ["a", "b", None]): logits = model(ids)     # one adapter per sequence

Threads (docs/lora.md): `adapter_ids` blocks belong to the thread that enters them; every function here that
changes a model's adapters holds lorart.nn.selection.MUTATION_LOCK, and `inject` is all or nothing.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterable

import torch
from torch import nn

from .nn.lora import LoRALinear, nf4_weight_of
from .nn.selection import MUTATION_LOCK, SELECTIONS, RowSelection


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or nf4_weight_of(m) is not None


def _output_layer_names(model: nn.Module) -> set[str]:
    """Module paths of the output embedding (lm_head): "all-linear" leaves it alone, as PEFT does."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for n, m in model.named_modules():
        if (out is not None and m is out) or n.split(".")[-1] == "lm_head":
            names.add(n)
    return names


def match_targets(model: nn.Module, targets) -> list[str]:
    """Module paths of the linear layers that `targets` selects: a list of names (a module matches when its
    path equals a name or ends with "." + name, PEFT's rule), a regex string (full match on the path), or
    "all-linear" (every linear layer except the output layer)."""
    cands, inside = [], []   # `inside`: LoRA layers' paths + ".", whose base and adapter linears are never targets
    for n, m in model.named_modules():
        if not n or any(n.startswith(p) for p in inside):
            continue
        if isinstance(m, LoRALinear):
            inside.append(n + ".")
            cands.append(n)
        elif _is_linear(m):
            cands.append(n)
    if targets == "all-linear":
        skip = _output_layer_names(model)
        return [n for n in cands if n not in skip]
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ValueError(f"lorart: inject: argument `targets`: invalid regex {targets!r}: {e}") from None
        return [n for n in cands if rx.fullmatch(n)]
    if isinstance(targets, Iterable):
        names = list(targets)
        if not all(isinstance(t, str) and t for t in names):
            raise TypeError(f"lorart: inject: argument `targets`: expected module names, got {names!r}")
        return [n for n in cands if any(n == t or n.endswith("." + t) for t in names)]
    raise TypeError(f"lorart: inject: argument `targets`: expected a list of names, a regex or 'all-linear', "
                    f"got {type(targets).__name__}")


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


class ModelEdit:
    """The changes `inject` / `load_adapter` make to a model, undone in reverse order when a step fails (a bad
    layer, out of memory, an interrupt): the model is then as it was, with the same modules, parameters and
    requires_grad flags. Use as ``with ModelEdit(model) as edit:`` while holding MUTATION_LOCK."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._undo: list = []
        self._flags: dict = {}   # id(parameter) -> (parameter, requires_grad before this edit): the first seen wins
        self._remember(model.parameters())

    def _remember(self, params) -> None:
        for p in params:
            self._flags.setdefault(id(p), (p, p.requires_grad))

    def replace(self, path: str, new: nn.Module) -> None:
        """Install `new` at `path`. (Building `new` may already have changed flags of parameters it shares with
        the model, e.g. LoRALinear sets its base's bias.requires_grad: the flags from before the edit are kept.)"""
        old = self.model.get_submodule(path)
        self._remember(new.parameters())
        _set_module(self.model, path, new)
        self._undo.append(lambda: _set_module(self.model, path, old))

    def add_adapter(self, layer: LoRALinear, name: str, **kw) -> None:
        prev = layer.active_adapter
        self._remember(layer.parameters())
        layer.add_adapter(name, **kw)

        def undo():
            layer.delete_adapter(name)
            layer.active_adapter = prev
        self._undo.append(undo)

    def __enter__(self) -> "ModelEdit":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            return
        for undo in reversed(self._undo):
            undo()
        for p, flag in self._flags.values():
            p.requires_grad_(flag)


def inject(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 16, alpha: float = 32.0, dropout: float = 0.05,
           quantize: str | None = None, rslora: bool = False, adapter_name: str = "default",
           train_bias: bool = False, blocksize: int = 64, double_quant: bool = True,
           freeze: bool = True) -> dict:
    """Wrap the linear layers chosen by `targets` in LoRALinear (optionally quantizing their base to NF4
    first), freeze every other parameter and return trainable_report(model). A layer that already has
    adapters gets `adapter_name` added to it."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"lorart: inject: argument `quantize`: expected 'nf4' or None, got {quantize!r}")
    from .nn.nf4_linear import NF4Linear

    with MUTATION_LOCK:
        paths = match_targets(model, targets)
        if not paths:
            raise ValueError(f"lorart: inject: argument `targets`: {targets!r} matched no linear layer of "
                             f"{type(model).__name__}")
        taken = [p for p in paths if isinstance(model.get_submodule(p), LoRALinear)
                 and adapter_name in model.get_submodule(p).adapter_names]
        if taken:
            raise ValueError(f"lorart: inject: argument `adapter_name`: layer {taken[0]!r} already has an adapter "
                             f"named {adapter_name!r}")
        if quantize == "nf4":
            meta = [p for p in paths if isinstance(model.get_submodule(p), nn.Linear)
                    and model.get_submodule(p).weight.is_meta]
            if meta:
                raise ValueError(f"lorart: inject: argument `quantize`: layer {meta[0]!r} has no weights (meta "
                                 "device): load them before quantizing")
        with ModelEdit(model) as edit:   # all or nothing: a failure on any layer undoes the others
            for path in paths:
                m = model.get_submodule(path)
                if isinstance(m, LoRALinear):
                    edit.add_adapter(m, adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
                    continue
                if quantize == "nf4" and isinstance(m, nn.Linear):
                    m = NF4Linear.from_linear(m, blocksize=blocksize, double_quant=double_quant,
                                              train_bias=train_bias)
                edit.replace(path, LoRALinear(m, r, alpha, dropout, rslora, adapter_name, train_bias))
            if freeze:
                for n, p in model.named_parameters():
                    p.requires_grad_(".lora_A." in n or ".lora_B." in n
                                     or (train_bias and n.endswith("base_layer.bias")))
        return trainable_report(model, verbose=False)


def trainable_report(model: nn.Module, verbose: bool = True) -> dict:
    """Total and trainable parameters (as in the PEFT literature's tables: NF4 weights count their
    elements, not their bytes), the trainable share in %, and the adapters' bytes. Prints a table when
    `verbose`."""
    total = trainable = adapter_bytes = 0
    for n, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        if ".lora_A." in n or ".lora_B." in n:
            adapter_bytes += p.numel() * p.element_size()
    frozen_nf4 = sum(int(torch.Size(w.shape).numel()) for m in model.modules()
                     if (w := nf4_weight_of(m)) is not None and not isinstance(m, LoRALinear))
    total += frozen_nf4
    layers = lora_layers(model)
    rep = {"total_params": total, "trainable_params": trainable,
           "trainable_percent": 100.0 * trainable / total if total else 0.0,
           "adapter_bytes": adapter_bytes, "lora_layers": len(layers),
           "adapters": sorted({a for m in layers.values() for a in m.adapter_names})}
    if verbose:
        print(format_report(rep))
    return rep


def format_report(rep: dict) -> str:
    rows = [("total params", f"{rep['total_params']:,}"), ("trainable params", f"{rep['trainable_params']:,}"),
            ("trainable %", f"{rep['trainable_percent']:.4f}"),
            ("adapter bytes", f"{rep['adapter_bytes']:,} ({rep['adapter_bytes'] / 2**20:.2f} MiB)"),
            ("LoRA layers", str(rep["lora_layers"])), ("adapters", ", ".join(rep["adapters"]) or "-")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active adapter of every LoRA layer; layers without it run their base (as PEFT), never an
    adapter that was active before."""
    with MUTATION_LOCK:
        layers = lora_layers(model).values()
        if not any(name in m.adapter_names for m in layers):
            raise KeyError(f"lorart: set_adapter: no layer has an adapter named {name!r}")
        for m in layers:
            if name in m.adapter_names:
                m.set_adapter(name)
            else:
                m.active_adapter = None


def disable_adapters(model: nn.Module) -> None:
    with MUTATION_LOCK:
        for m in lora_layers(model).values():
            m.disable_adapters()


def enable_adapters(model: nn.Module) -> None:
    with MUTATION_LOCK:
        for m in lora_layers(model).values():
            m.enable_adapters()


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = True,
          keep_original: str = "host") -> None:
    """Merge into every LoRA layer (see LoRALinear.merge); on a refusal, layers merged so far are unmerged."""
    with MUTATION_LOCK:
        done = []
        try:
            for m in lora_layers(model).values():
                m.merge(adapter_names, safe_merge=safe_merge, keep_original=keep_original)
                done.append(m)
        except BaseException:
            for m in done:
                m.unmerge()
            raise


def unmerge(model: nn.Module) -> None:
    with MUTATION_LOCK:
        for m in lora_layers(model).values():
            m.unmerge()


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids, lengths=None):
    """Per-sequence (or per-row) adapter selection for the forwards this thread runs inside the block, on every
    LoRA layer under `model` (any module: a whole model or a part of it). `ids` holds adapter names (None =
    base model only), indices into each layer's adapter_names, or an integer tensor of indices; None selects
    nothing (the layers' active adapter). `lengths` (packed batches): ids[i] covers lengths[i] consecutive rows.
    A name must exist in some layer under `model` (KeyError); layers without it give its rows their base output,
    as PEFT's mixed batches. All rows run in one grouped launch per layer (lorart::lora_grouped_add_).
    Inference: no gradients reach the adapters.

    Per thread and per asyncio task: other threads and tasks do not see the selection (a task created inside
    the block sees it until the block ends), so several threads or tasks can run forwards with different
    adapters on one model at once; blocks nest (the inner one wins until it ends)."""
    layers = list(lora_layers(model).values())
    if ids is not None and not isinstance(ids, torch.Tensor):
        ids = list(ids)
        known = {n for m in layers for n in m.adapter_names}
        for a in ids:
            if isinstance(a, str) and a not in known:
                raise KeyError(f"lorart: adapter_ids: no adapter named {a!r} (have {sorted(known)})")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1).cpu()
        if ids is None or len(ids) != len(lengths) or bool((lengths < 0).any()):
            raise ValueError(f"lorart: adapter_ids: argument `lengths`: expected one count >= 0 per entry of `ids` "
                             f"({0 if ids is None else len(ids)}), got {lengths.tolist()}")
    saved = SELECTIONS.enter(layers, None if ids is None else RowSelection(ids, lengths))
    try:
        yield
    finally:
        SELECTIONS.leave(saved)
