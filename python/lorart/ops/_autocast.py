"""torch.autocast for lorart's ops: one rule per op, applied the same way by the dispatcher (torch.ops.lorart.*,
which torch.compile traces) and by the eager fast paths (which bypass the dispatcher).

A rule names the arguments that are cast, and says to what, when autocast is on for the op's device:

- ``Lower("x", ...)``: to the autocast dtype, as torch does for its linear-algebra ops (``F.linear``, ``mm``):
  floating tensors other than float64 on the autocast device. The LoRA and NF4 linears.
- ``Promote("x", ...)``: to the promoted dtype of those arguments, as torch's elementwise ops do with mixed
  inputs (``F.silu(gate) * up``; LlamaRMSNorm's ``weight * h.to(dtype)``). SwiGLU and RMSNorm.
- ``Like("y", ...)``: to the dtype of the first named argument (what an in-place op writes). Merge, the
  grouped add.
- ``Keep()``: nothing is cast.

Either way the op then runs with autocast excluded, so that torch ops inside an implementation (a matmul
after a dequantisation) compute in the dtypes the op chose and the fake kernel's output dtypes stay true.
"""
from __future__ import annotations

import torch

_any_enabled = torch._C._is_any_autocast_enabled
_KEYS = {dev: torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autocast" + key))
         for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument (CUDA only)
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype:
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def excluded(device_type: str):
    """A context in which autocast does not apply to ops on `device_type`."""
    return torch._C._ExcludeDispatchKeyGuard(_KEYS[device_type])


def _eligible(t, device_type: str) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
        and t.device.type == device_type


class Keep:
    """No argument is cast (the op still runs with autocast excluded)."""

    def __init__(self, *names: str):
        self.names = names
        self.idx: tuple = ()

    def bind(self, index: dict, device_tensor) -> "Keep":
        """This rule with argument names resolved to positions (an op's own copy); `device_tensor(args)`: the
        tensor whose device decides whether autocast is on."""
        b = type(self).__new__(type(self))
        b.__dict__.update(self.__dict__)
        b.idx = tuple(index[n] for n in self.names)
        b.device_tensor = device_tensor
        return b

    def device_of(self, args: tuple) -> str | None:
        """The device type whose autocast is on for this call, or None."""
        t = self.device_tensor(args)
        if not isinstance(t, torch.Tensor):
            return None
        dev = t.device.type
        return dev if dev in _KEYS and enabled(dev) else None

    def cast(self, args: tuple, device_type: str) -> tuple:
        return args


class Lower(Keep):
    """The named arguments to the autocast dtype (as F.linear)."""

    def cast(self, args, device_type):
        dt = autocast_dtype(device_type)
        a = list(args)
        for i in self.idx:
            if _eligible(a[i], device_type) and a[i].dtype != dt:
                a[i] = a[i].to(dt)
        return tuple(a)


class Promote(Keep):
    """The named arguments to their promoted dtype (as elementwise ops with mixed inputs)."""

    def cast(self, args, device_type):
        ts = [args[i] for i in self.idx if isinstance(args[i], torch.Tensor) and args[i].is_floating_point()]
        if not ts:
            return args
        dt = ts[0].dtype
        for t in ts[1:]:
            dt = torch.promote_types(dt, t.dtype)
        a = list(args)
        for i in self.idx:
            if isinstance(a[i], torch.Tensor) and a[i].is_floating_point() and a[i].dtype != dt:
                a[i] = a[i].to(dt)
        return tuple(a)


class Like(Keep):
    """The named arguments (after the first) to the dtype of the first (what an in-place op writes)."""

    def cast(self, args, device_type):
        ref, *rest = self.idx
        dt = args[ref].dtype
        a = list(args)
        for i in rest:
            if _eligible(a[i], device_type) and a[i].dtype != dt:
                a[i] = a[i].to(dt)
        return tuple(a)


_lib = torch.library.Library("lorart", "IMPL")


def register(op, rule: Keep, unflatten, flatten) -> None:
    """The dispatcher's autocast kernels (CPU and CUDA) of `op` (an OpOverload): cast by `rule` (on the op's
    Python-level arguments), then run with autocast excluded."""
    name = op._schema.name.split("::")[1]
    for dev, keyset in _KEYS.items():
        def kernel(_keyset, *flat, _dev=dev, _ks=keyset):
            args = rule.cast(unflatten(flat), _dev)
            with torch._C._ExcludeDispatchKeyGuard(_ks):
                return op(*flatten(args))
        _lib.impl(name, kernel, "Autocast" + ("CPU" if dev == "cpu" else "CUDA"), with_keyset=True)


any_enabled = _any_enabled

__all__ = ["Keep", "Lower", "Promote", "Like", "register", "excluded", "enabled", "autocast_dtype", "any_enabled"]
