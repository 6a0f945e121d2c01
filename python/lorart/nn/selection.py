"""Which adapter each row of a batch uses, per thread and asyncio task, and the lock that serialises adapter changes.

Three ways to choose per-row adapters for a LoRALinear, the first given wins:

1. ``layer(x, adapter_ids=ids)``: explicit, for this call only;
2. ``with lorart.adapter_ids(module, ids):``: the code inside the block only (this thread; with asyncio this
   task and the tasks it starts inside the block), every LoRA layer under `module`, until the block ends
   (nestable; blocks on different sub-modules combine);
3. ``layer.adapter_ids = ids``: the layer's own setting, shared by every thread (for the one thread that runs
   the model, e.g. a serving scheduler).

`ids` holds one entry per sequence or per row: an adapter name, an index into the layer's ``adapter_names``,
or None / -1 for the base model; or an integer tensor of indices.

``MUTATION_LOCK`` (re-entrant) is held by everything that adds, removes, wraps or (de)activates adapters
(``inject``, ``load_adapter``, ``LoRALinear.add_adapter`` / ``delete_adapter``, ...): concurrent changes
run one after the other. Forwards never take it.
"""
from __future__ import annotations

import contextvars
import threading

import torch
from torch import Tensor

MUTATION_LOCK = threading.RLock()


def row_indices(ids, names, rows: int, batch: int, missing_as_base: bool = False) -> Tensor:
    """Per-row adapter indices (into `names`; -1 = none) from names/None or ints per row or per batch.
    A name not in `names` raises KeyError, or selects the base model when `missing_as_base`."""
    if isinstance(ids, Tensor):
        idx = ids.to(torch.int64).reshape(-1)
        # (a CUDA tensor is not range-checked here, which would synchronise: the kernels skip bad indices)
    else:
        conv = []
        for a in ids:
            if a is None:
                conv.append(-1)
            elif isinstance(a, str):
                if a in names:
                    conv.append(names.index(a))
                elif missing_as_base:
                    conv.append(-1)
                else:
                    raise KeyError(f"lorart: adapter_ids: no adapter named {a!r} (have {list(names)})")
            else:
                conv.append(int(a))
        idx = torch.tensor(conv, dtype=torch.int64)
    if not idx.is_cuda and idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= len(names)):
        raise ValueError(f"lorart: adapter_ids: indices must be in [-1, {len(names)}), got {idx.tolist()}")
    if idx.numel() == batch and rows % max(batch, 1) == 0 and idx.numel() != rows:
        idx = idx.repeat_interleave(rows // batch)
    if idx.numel() != rows:
        raise ValueError(f"lorart: adapter_ids: expected one id per sequence ({batch}) or per row ({rows}), "
                         f"got {idx.numel()}")
    return idx


class RowSelection:
    """One `lorart.adapter_ids` block's ids, converted once per (layer adapter list, shape, device) and cached.
    Names some layers lack give those layers' rows the base output (the block checked that each name exists in
    at least one layer). With `lengths`, ids[i] covers lengths[i] consecutive rows (a packed batch). Used by one
    thread only."""

    __slots__ = ("ids", "lengths", "_cache")

    def __init__(self, ids, lengths: Tensor | None = None):
        self.ids = ids
        self.lengths = lengths
        self._cache: dict = {}

    def indices(self, names: tuple, rows: int, batch: int, device) -> Tensor:
        ids = self.ids
        key = (names, rows, batch, device, ids._version if isinstance(ids, Tensor) else None)
        idx = self._cache.get(key)
        if idx is None:
            if len(self._cache) > 16:
                self._cache.clear()
            if self.lengths is None:
                idx = row_indices(ids, list(names), rows, batch, missing_as_base=True)
            else:
                n = int(self.lengths.sum())
                if n != rows:
                    raise ValueError(f"lorart: adapter_ids: `lengths` cover {n} rows, the input has {rows}")
                per_seq = row_indices(ids, list(names), len(self.lengths), len(self.lengths), missing_as_base=True)
                idx = per_seq.repeat_interleave(self.lengths)
            idx = self._cache[key] = idx.to(device, non_blocking=True)
        return idx


_NONE = object()


class _Block:
    """One open `lorart.adapter_ids` block: the layers it covers, their selection, and the block it was opened
    inside (in this context). A closed block selects nothing, also for the tasks it started."""
    __slots__ = ("layers", "selection", "outer", "open")

    def __init__(self, layers, selection, outer):
        self.layers, self.selection, self.outer, self.open = frozenset(layers), selection, outer, True


class Selections:
    """The open blocks of every thread and asyncio task, in a context variable: a thread sees only its own blocks;
    an asyncio task its own and those open around the point where it was created (asyncio copies the context),
    until they end; a thread started inside a block does not see it (threads start with an empty context).
    ``active`` counts open blocks, so layers skip the lookup when nothing anywhere selects."""

    def __init__(self):
        self.active = 0
        self._count_lock = threading.Lock()
        self._current = contextvars.ContextVar("lorart_adapter_ids", default=None)

    def lookup(self, layer, default):
        """The selection of the innermost open block around this code that covers `layer` (a RowSelection or
        None), else `default`."""
        b = self._current.get()
        while b is not None:
            if b.open and layer in b.layers:
                return b.selection
            b = b.outer
        return default

    def enter(self, layers, selection) -> tuple:
        """Open a block selecting `selection` for `layers` here; returns what `leave` needs."""
        block = _Block(layers, selection, self._current.get())
        token = self._current.set(block)
        with self._count_lock:
            self.active += 1
        return block, token

    def leave(self, saved: tuple) -> None:
        block, token = saved
        block.open = False
        try:
            self._current.reset(token)
        except ValueError:   # left in another context than it was entered in (a generator resumed elsewhere)
            if self._current.get() is block:
                self._current.set(block.outer)
        with self._count_lock:
            self.active -= 1


SELECTIONS = Selections()
