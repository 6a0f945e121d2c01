"""FSDP2 for the recipe (`fsdp=True`, `--fsdp`): `torch.distributed.fsdp.fully_shard` per decoder layer and at the
root, so every rank holds 1/N of each parameter (frozen base, NF4 storage, trainable weights), of the gradients
and of the optimizer states, and all-gathers one layer's parameters at a time for compute.

- NF4 bases: NF4Linear keeps its 4-bit storage in buffers, which FSDP2 leaves whole; `NF4Linear.shardable()` holds
  it as frozen uint8/float32 parameters instead, which FSDP2 shards like any other (mixed dtypes are all-gathered
  through one uint8 buffer) and all-gathers per layer: the forward reads them at each call, so it computes on
  the whole 4-bit weight while each rank stores 1/N of it.
- Gradients are summed, not averaged (divide factor 1, with SUM collectives, which gloo needs): the recipe
  normalises the loss by the target tokens of the whole global batch.
- Whole tensors when needed: `full_tensor` (every rank takes part), `scatter_like` (rank 0's whole tensor to
  each rank's shard), `full_params_on_main` (rank 0's modules temporarily hold whole parameters, so that a
  method's own `save` writes its artifact unchanged).

torch.distributed.tensor is imported only here, and only when a run shards (it takes a second to import).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn.nf4_linear import NF4Linear


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else mod.DTensor


def is_sharded(t) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, else the tensor itself."""
    if is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls it, in the same order)."""
    if is_sharded(t):
        with torch.no_grad():
            return t.full_tensor()
    return t


def decoder_layers(model: nn.Module) -> list:
    """The repeated blocks FSDP2 shards one by one: lorart's and transformers' `*DecoderLayer` modules."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def apply_fsdp(model: nn.Module, device: torch.device) -> int:
    """Shard `model` in place over the default process group; returns the number of FSDP groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.shardable()
    groups = decoder_layers(model)
    for layer in groups:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in groups + [model]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return len(groups) + 1


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module's parameters back in their sharded form. A forward without backward (evaluation)
    leaves the root's parameters (embeddings, final norm, head) unsharded, as plain tensors, until the next
    forward: code that reads the modules' parameters must see DTensors everywhere."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def scatter_like(full: Optional[torch.Tensor], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """This rank's part of rank 0's whole tensor `full` (of `dtype`; None on the other ranks), laid out as `like`:
    a sharded parameter's local shard, else the whole tensor (broadcast). Every rank takes part."""
    dev = local_of(like).device
    src = full.to(dev, dtype) if full is not None else torch.empty(like.shape, dtype=dtype, device=dev)
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(src, like.device_mesh, like.placements, src_data_rank=0).to_local()
    dist.broadcast(src, 0)
    return src


@contextlib.contextmanager
def full_params_on_main(model: nn.Module, is_main: bool, trainable_only: bool = True, have: Optional[dict] = None):
    """While inside: on rank 0, the model's sharded parameters (the trainable ones, or all) are whole CPU
    parameters, so code that reads the modules (a method's `save`) sees the whole weights; the other ranks only
    take part in the gathers. `have`: whole tensors already gathered, by parameter name (the same names on every
    rank; the tensors on rank 0). Outside FSDP: nothing changes."""
    swapped, whole = [], {}
    have = have or {}
    reshard(model)
    with torch.no_grad():
        for prefix, mod in model.named_modules():
            for name, p in list(mod._parameters.items()):
                if p is None or not is_sharded(p) or (trainable_only and not p.requires_grad):
                    continue
                if id(p) not in whole:   # tied weights are gathered once and swapped in every module
                    qual = f"{prefix}.{name}" if prefix else name
                    full = have[qual] if qual in have else p.full_tensor()
                    whole[id(p)] = nn.Parameter(full.cpu(), requires_grad=p.requires_grad) if is_main else None
                    del full
                if is_main:
                    mod._parameters[name] = whole[id(p)]
                    swapped.append((mod, name, p))
    try:
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p
