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

- Traffic: each FSDP module's all-gather and reduce-scatter go through `_CountingAllGather` /
  `_CountingReduceScatter`, set with FSDP2's public `FSDPModule.set_custom_all_gather` / `set_custom_reduce_scatter`:
  the same collectives torch's defaults issue (all_gather_single, reduce_scatter_single), each whole buffer's
  bytes handed to `count(kind, nbytes)`. `traffic_layout` is what they should add up to per forward+backward.

torch.distributed.tensor is imported only here, and only when a run shards (it takes a second to import).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..dtensor import is_sharded, local_of
from ..nn.nf4_linear import NF4Linear


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls it, in the same order)."""
    if is_sharded(t):
        with torch.no_grad():
            return t.full_tensor()
    return t


def decoder_layers(model: nn.Module) -> list:
    """The repeated blocks FSDP2 shards one by one: lorart's and transformers' `*DecoderLayer` modules."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


class _CountingComm:
    """FSDP2's buffers for a collective: plain `torch.empty`, as torch's default. The methods are those of FSDP2's
    `AllGather` / `ReduceScatter` interfaces (duck-typed: the interfaces live in a private module)."""

    def __init__(self, count: Callable[[str, int], None]):
        self.count = count

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)


class _CountingAllGather(_CountingComm):
    """One FSDP group's parameters all-gathered: counts the gathered (whole, padded) buffer's bytes."""

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        self.count("allgather_bytes", output_tensor.numel() * output_tensor.element_size())
        return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


class _CountingReduceScatter(_CountingComm):
    """One FSDP group's gradients reduce-scattered: counts the input (whole, padded) buffer's bytes."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        self.count("reduce_scatter_bytes", input_tensor.numel() * input_tensor.element_size())
        return dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def _padded_bytes(p: torch.Tensor, world: int) -> int:
    """The bytes of `p` in FSDP2's collective buffers: dim 0 padded to a multiple of the world size."""
    if p.dim() == 0:
        return p.element_size() * world
    rows = -(-p.shape[0] // world) * world
    return rows * (p.numel() // max(p.shape[0], 1)) * p.element_size()


def traffic_layout(model: nn.Module) -> dict:
    """What one forward+backward of the sharded `model` should move, as whole (padded) buffer bytes:
    `layer_param_bytes` (the decoder layers' parameters, all-gathered twice: forward, and again in backward since
    FSDP2 reshards them after forward), `root_param_bytes` (the root's own parameters: embeddings, final norm, head,
    all-gathered once: FSDP2 keeps the root unsharded from forward to backward) and `grad_bytes` (the trainable
    parameters' gradients, reduce-scattered once)."""
    world = dist.get_world_size()
    in_layers = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    out = {"layer_param_bytes": 0, "root_param_bytes": 0, "grad_bytes": 0}
    for p in model.parameters():   # each parameter once (tied weights too)
        b = _padded_bytes(p, world)
        out["layer_param_bytes" if id(p) in in_layers else "root_param_bytes"] += b
        out["grad_bytes"] += b if p.requires_grad else 0
    return out


def apply_fsdp(model: nn.Module, device: torch.device, count: Optional[Callable[[str, int], None]] = None) -> int:
    """Shard `model` in place over the default process group; returns the number of FSDP groups. `count(kind,
    nbytes)`: told the bytes of every all-gather and reduce-scatter FSDP2 issues."""
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
        if count is not None:
            m.set_custom_all_gather(_CountingAllGather(count))
            m.set_custom_reduce_scatter(_CountingReduceScatter(count))
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
