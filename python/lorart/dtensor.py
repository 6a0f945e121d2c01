"""FSDP2's sharded tensors (torch.distributed.tensor.DTensor) as the rest of lorart sees them: `is_sharded(t)`, and
`local_of(t)`, the part of `t` this rank holds, which kernels read and write (PagedAdamW's fused steps, the recipe's
restored weights). No DTensor can exist before torch.distributed.tensor is imported, and importing it costs a
second: it is looked up here, never imported.
"""
from __future__ import annotations

import sys

import torch


def is_sharded(t) -> bool:
    """`t` is a DTensor (FSDP2's sharded parameters and gradients, and their optimizer states)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (a fresh view of the current shard on each call), else
    the tensor itself."""
    if is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t
