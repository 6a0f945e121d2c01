"""Which adapter each row of a batch uses, per thread, and the lock that serialises adapter changes.

Three ways to choose per-row adapters for a LoRALinear, the first given wins:

1. ``layer(x, adapter_ids=ids)``: explicit, for this call only;
2. ``with lorart.adapter_ids(module, ids):``: this thread only, every LoRA layer under `module`, until the
   block ends (nestable; blocks on different sub-modules combine);
3. ``layer.adapter_ids = ids``: the layer's own setting, shared by every thread (for the one thread that runs
   the model, e.g. a serving scheduler).

`ids` holds one entry per sequence or per row: an adapter name, an index into the layer's ``adapter_names``,
or None / -1 for the base model; or an integer tensor of indices.

``MUTATION_LOCK`` (re-entrant) is held by everything that adds, removes, wraps or (de)activates adapters
(``inject``, ``load_adapter``, ``LoRALinear.add_adapter`` / ``delete_adapter``, ...): concurrent changes
run one after the other. Forwards never take it.
"""
from __future__ import annotations

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


class ThreadSelections(threading.local):
    """This thread's per-layer selections (layer -> RowSelection, or None for "no per-row selection")."""

    def __init__(self):
        self.by_layer: dict = {}


class Selections:
    """The per-thread selections of every thread; ``active`` counts threads inside a block, so layers skip
    the thread-local lookup when no thread selects anything."""

    def __init__(self):
        self.active = 0
        self._count_lock = threading.Lock()
        self._local = ThreadSelections()

    def lookup(self, layer, default):
        """This thread's selection for `layer` (a RowSelection or None), else `default`."""
        return self._local.by_layer.get(layer, default)

    def enter(self, layers, selection) -> list:
        """Select `selection` for `layers` in this thread; returns what `leave` needs to restore."""
        mine = self._local.by_layer
        saved = [(m, mine.get(m, _NONE)) for m in layers]
        was = bool(mine)
        for m in layers:
            mine[m] = selection
        self._count(was, bool(mine))
        return saved

    def leave(self, saved: list) -> None:
        mine = self._local.by_layer
        was = bool(mine)
        for m, old in reversed(saved):
            if old is _NONE:
                mine.pop(m, None)
            else:
                mine[m] = old
        self._count(was, bool(mine))

    def _count(self, was: bool, now: bool) -> None:
        if was != now:
            with self._count_lock:
                self.active += 1 if now else -1


SELECTIONS = Selections()
