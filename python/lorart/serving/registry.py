"""The adapters a server serves: name -> folder, which of them are loaded into the model (at most
`max_resident`, the least recently used idle one evicted first), and how many requests use each.

Loading is `lorart.load_adapter` itself (strict: every check runs before the model is touched; never pickle),
under an internal name (``serve_<n>``: user names may hold '/', '.' and more), plus the base-model check
`lorart generate` makes for a lorart folder (its lorart_method.json names the model shape it was trained on). A
folder whose files change on disk after it was registered is refused when it must be read again (after an
eviction), rather than serving other weights under the same name. Evicting deletes the adapter
from its layers and puts a layer that has no adapter left back to its base layer. Model changes happen only in
the engine thread, between two forwards; the bookkeeping (`acquire` / `release`) is safe from any thread.
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field

from torch import nn

from ..adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, load_adapter
from ..fileformats import METHOD_FILE, read_method_file
from ..inject import lora_layers
from ..methods.base import check_shape


class UnknownModel(LookupError):
    """A request names a model (adapter) that is not served."""


class AdapterConflict(ValueError):
    """A name already in use, or the base model's name."""


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: str
    key: str                    # the adapter's name inside the model's LoRA layers
    resident: bool = False
    refs: int = 0               # accepted requests not finished yet (queued or running)
    running: int = 0            # requests in the running batch (they pin the adapter in the model)
    last_used: int = 0
    unloading: bool = False
    modules: list = field(default_factory=list)
    files: tuple | None = None  # (inode, size, mtime) of its files when first loaded


def folder_files(path: str) -> tuple:
    """What identifies the contents of an adapter folder without reading it: each file's inode, size, mtime."""
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME, METHOD_FILE):
        try:
            st = os.stat(os.path.join(path, name))
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class AdapterRegistry:
    def __init__(self, model: nn.Module, max_resident: int, base_name: str, on_change=None):
        """`on_change(kind)` is called after each load ("load") and eviction ("evict")."""
        if not isinstance(max_resident, int) or max_resident < 1:
            raise ValueError(f"max_adapters: expected an integer >= 1, got {max_resident!r}")
        self.model = model
        self.max_resident = max_resident
        self.base_name = base_name
        self.lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._keys = (f"serve_{i}" for i in itertools.count())
        self._clock = itertools.count(1)
        self._on_change = on_change or (lambda kind: None)

    # ---- any thread ---------------------------------------------------------------------------------------------
    def names(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(e.name, e.path) for e in self._entries.values() if not e.unloading]

    def acquire(self, name: str) -> AdapterEntry:
        """The entry for a request naming adapter `name`, counted as in use until `release`."""
        with self.lock:
            e = self._entries.get(name)
            if e is None or e.unloading:
                raise UnknownModel(name)
            e.refs += 1
            return e

    def release(self, entry: AdapterEntry) -> None:
        with self.lock:
            entry.refs -= 1

    def get(self, name: str) -> AdapterEntry | None:
        with self.lock:
            return self._entries.get(name)

    def mark_unloading(self, name: str) -> AdapterEntry:
        """Stop accepting requests for `name`; the engine removes it once its requests are done."""
        with self.lock:
            e = self._entries.get(name)
            if e is None or e.unloading:
                raise UnknownModel(name)
            e.unloading = True
            return e

    @property
    def resident_count(self) -> int:
        with self.lock:
            return sum(e.resident for e in self._entries.values())

    # ---- engine thread only -------------------------------------------------------------------------------------
    def add(self, name: str, path: str) -> AdapterEntry:
        """Register adapter `name` from folder `path`, validated by loading it into the model (errors from
        lorart.load_adapter propagate; nothing is changed then). It stays loaded unless the cache is over its
        bound, in which case the least recently used idle adapters are evicted (possibly this one)."""
        if not isinstance(name, str) or not name.strip():
            raise AdapterConflict("lora_name: expected a non-empty string")
        if not isinstance(path, str) or not path:
            raise AdapterConflict("lora_path: expected a non-empty string")
        with self.lock:
            if name == self.base_name or name in self._entries:
                raise AdapterConflict(f"The lora adapter '{name}' has already been loaded" if name != self.base_name
                                      else f"'{name}' is the base model's name")
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"lorart: {path}: no such adapter folder")
        inner = os.path.join(path, "adapter")
        if not os.path.exists(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(inner, CONFIG_NAME)):
            raise AdapterFileError(f"lorart: {path}: a `lorart train` output folder, not an adapter folder: its "
                                   f"adapter is {inner}")
        entry = AdapterEntry(name, path, next(self._keys))
        self._load(entry)
        with self.lock:
            self._entries[name] = entry
        self._shrink()
        return entry

    def ensure_resident(self, entry: AdapterEntry) -> bool:
        """Load `entry` into the model if it is not (evicting an idle adapter when the cache is full). False
        when every resident adapter is pinned by running requests: try again after a step."""
        entry.last_used = next(self._clock)
        if entry.resident:
            return True
        if self.resident_count >= self.max_resident and not self._evict_one(exclude=entry):
            return False
        self._load(entry)
        return True

    def remove(self, entry: AdapterEntry) -> None:
        """Forget an adapter whose requests are all done (after mark_unloading)."""
        if entry.resident:
            self._evict(entry)
        with self.lock:
            self._entries.pop(entry.name, None)

    def _load(self, entry: AdapterEntry) -> None:
        files = folder_files(entry.path)
        if entry.files is not None and files != entry.files:
            raise AdapterFileError(f"lorart: {entry.path}: the folder changed on disk since it was loaded as "
                                   f"'{entry.name}' (files replaced or modified): unload it and load it again to "
                                   "serve the new weights")
        meta = read_method_file(entry.path, AdapterFileError)
        if meta is not None:  # what `lorart generate` checks: the model the adapter was trained on
            check_shape(self.model, meta["base_model"], meta["path"])
        entry.modules = load_adapter(self.model, entry.path, name=entry.key, activate=False)
        entry.files = files
        entry.resident = True
        entry.last_used = next(self._clock)
        self._on_change("load")

    def _evict(self, entry: AdapterEntry) -> None:
        for path, m in lora_layers(self.model).items():
            if entry.key in m.adapter_names:
                m.delete_adapter(entry.key)
                if not m.adapter_names:  # no adapter left: the plain base layer again
                    parent, _, leaf = path.rpartition(".")
                    setattr(self.model.get_submodule(parent) if parent else self.model, leaf, m.base_layer)
        entry.resident = False
        self._on_change("evict")

    def _evict_one(self, exclude: AdapterEntry | None = None) -> bool:
        with self.lock:
            idle = [e for e in self._entries.values() if e.resident and e.running == 0 and e is not exclude]
        if not idle:
            return False
        self._evict(min(idle, key=lambda e: e.last_used))
        return True

    def _shrink(self) -> None:
        while self.resident_count > self.max_resident and self._evict_one():
            pass
