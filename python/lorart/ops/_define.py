"""One definition per op: the schema, the fake kernel, autograd, autocast and the eager fast path of a
torch.ops.lorart op all come from one :class:`Op` (see docs/DEVELOPING.md, "Op definitions").

    RMS_NORM = Op("rms_norm", _impl, check=_check, fake=_fake, setup=_setup, backward=_backward,
                  diff=("x", "weight"), nondiff_outputs=(1,), autocast=Promote("x", "weight"), samples=_samples)

- The schema is inferred from ``impl``'s annotations. A parameter annotated with a NamedTuple class (``NF4Args``)
  is one object in Python and its fields in the schema: it is flattened when the dispatcher is called and
  rebuilt in the op's kernels, here and nowhere else.
- ``check(*args)`` runs before the real kernel and before the fake one (the same Python checks); the C++ API
  checks once more on its own for C++ callers.
- ``setup(ctx, args, out)`` / ``backward(ctx, *grads)`` are registered with torch.library and also make the
  eager ``autograd.Function``; ``ctx.eager`` tells them which one runs (backward then calls other ops' ``impl``
  directly, or the dispatcher); ``ctx.needs`` is ``needs_input_grad`` per Python-level argument.
- ``op(*args)``: under torch.compile the dispatcher op; in eager mode the autocast rule, ``check``, then the
  ``autograd.Function`` when autograd would record the call, else ``impl`` itself (no dispatcher: a few
  microseconds instead of tens, which decides small layers).
- ``samples(device, dtype)``: argument tuples (Python-level) covering the op's cases, zero-size included, for the
  conformance harness (tests/test_ops_conformance.py); an empty list where the op does not take that dtype.
"""
from __future__ import annotations

import inspect
import typing

import torch
from torch import Tensor

from . import _autocast as ac
from ._common import check_device

REGISTRY: dict[str, "Op"] = {}  # name -> Op, every op under torch.ops.lorart

_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_once = torch.autograd.function.once_differentiable


def _is_group(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, tuple) and hasattr(ann, "_fields")


class Op:
    def __init__(self, name: str, impl, *, check, fake, mutates: tuple = (), setup=None, backward=None,
                 diff: tuple = (), nondiff_outputs: tuple = (), autocast: ac.Keep = ac.Keep(), device: str = "",
                 samples=None):
        self.name, self.impl, self.check, self.fake = name, impl, check, fake
        self.setup, self.backward, self.samples = setup, backward, samples
        sig = self._sig = inspect.signature(impl)
        hints = typing.get_type_hints(impl)
        names = list(sig.parameters)
        idx = {n: i for i, n in enumerate(names)}
        # flat schema parameters; groups (NamedTuple parameters) expand to their fields
        flat, self._groups = [], []
        for i, (n, p) in enumerate(sig.parameters.items()):
            ann = hints[n]
            if _is_group(ann):
                self._groups.append((i, len(flat), ann))
                fh = typing.get_type_hints(ann)
                flat += [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=fh[f])
                         for f in ann._fields]
            else:
                flat.append(p.replace(annotation=ann))
        ret = hints.get("return", None)
        n_out = len(typing.get_args(ret)) if typing.get_origin(ret) is tuple else 1
        self._diff_outputs = tuple(i for i in range(n_out) if i not in nondiff_outputs)
        assert self._diff_outputs[:1] == (0,) or backward is None, "the differentiable output comes first"
        self.mutates = tuple(idx[m] for m in mutates)
        self.diff = tuple(idx[d] for d in diff)
        self.nondiff_outputs = nondiff_outputs
        self._dev = idx[device or names[0]]
        self._dev_name = device or names[0]
        dev_ann = hints[self._dev_name]
        self._dev_field = dev_ann._fields[0] if _is_group(dev_ann) else None  # a group: its first field's device
        if self._dev_field:
            self._dev_name = self._dev_field
        self._dev_plain = dev_ann in (Tensor, typing.Optional[Tensor])  # (the device tensor is the argument itself)
        self.autocast = autocast.bind(idx, self.device_tensor)

        def real(*a):
            args = self.unflatten(a)
            self.check(*args)
            self.check_device(args)
            return self.impl(*args)
        real.__signature__ = inspect.Signature(flat, return_annotation=None if ret is type(None) else ret)
        real.__name__ = name
        self.custom = torch.library.custom_op(f"lorart::{name}", real, mutates_args=tuple(mutates))

        def fake_kernel(*a):
            args = self.unflatten(a)
            self.check(*args)
            return self.fake(*args)
        self.custom.register_fake(fake_kernel)
        self.op = getattr(torch.ops.lorart, name).default
        self._fn = self._fn_full = None
        if backward is not None:
            self.custom.register_autograd(self._op_backward, setup_context=self._op_setup)
            self._fn, self._fn_full = _function(self, False), _function(self, True)
        ac.register(self.op, self.autocast, self.unflatten, self.flatten)
        REGISTRY[name] = self

    # ---- flattening of grouped arguments (the one place) --------------------------------------------------
    def flatten(self, args: tuple) -> tuple:
        if not self._groups:
            return args
        out, last = [], 0
        for i, _, g in self._groups:
            out += args[last:i]
            w = args[i]
            out += [getattr(w, f) for f in g._fields]
            last = i + 1
        out += args[last:]
        return tuple(out)

    def unflatten(self, flat: tuple) -> tuple:
        if not self._groups:
            return flat
        out, last = [], 0
        for _, j, g in self._groups:
            out += flat[last:j]
            n = len(g._fields)
            out.append(g(*flat[j:j + n]))
            last = j + n
        out += flat[last:]
        return tuple(out)

    # ---- calls --------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if kwargs:  # (the per-call paths pass positional arguments: no binding there)
            bound = self._sig.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        if _compiling():
            return self.op(*self.flatten(args))
        if ac.any_enabled():
            dev = self.autocast.device_of(args)
            if dev is not None:
                args = self.autocast.cast(args, dev)
                with ac.excluded(dev):
                    return self._eager(args, False)
        return self._eager(args, False)

    def first(self, *args):
        """op(*args)[0] (for the public functions that return the first output): in eager mode without building
        the other outputs' tuple."""
        if _compiling():
            return self.op(*self.flatten(args))[0]
        if ac.any_enabled():
            dev = self.autocast.device_of(args)
            if dev is not None:
                args = self.autocast.cast(args, dev)
                with ac.excluded(dev):
                    return self._eager(args, True)
        return self._eager(args, True)

    def dispatch(self, *args):
        """Through the dispatcher (what torch.compile sees), grouped arguments flattened."""
        return self.op(*self.flatten(args))

    def run(self, ctx, *args):
        """For another op's backward: ``impl`` directly in the eager Function, the dispatcher otherwise."""
        return self.impl(*args) if ctx.eager else self.op(*self.flatten(args))

    def device_tensor(self, args):
        """The tensor whose device the op runs on (its `device` argument; a list's first; a group's first field)."""
        t = args[self._dev]
        if self._dev_field:
            return getattr(t, self._dev_field)
        if isinstance(t, (list, tuple)):
            return t[0] if t else None
        return t

    def check_device(self, args) -> None:
        t = self.device_tensor(args)
        if t is not None and not t.is_cpu:
            check_device(t, self._dev_name)

    def _eager(self, args, first: bool):
        self.check(*args)
        t = args[self._dev] if self._dev_plain else self.device_tensor(args)
        if t is not None and not t.is_cpu:
            if not t.is_cuda:  # meta tensors (shape inference): the fake kernel; other devices: the dispatcher
                return self.dispatch(*args)
            check_device(t, self._dev_name)
        if self._fn is not None and self._records(args):
            if first or not self.nondiff_outputs:
                return self._fn.apply(*args)
            holder = []  # the Function returns the differentiable output only (each autograd output costs); the
            y = self._fn_full.apply(*args, holder)  # others come back through `holder`, untracked as they would be
            return (y,) + holder[0][1:]  # (the differentiable output comes first)
        out = self.impl(*args)
        for i in self.mutates:
            torch.autograd.graph.increment_version(args[i])
        return out[0] if first else out

    def _records(self, args) -> bool:
        """Whether autograd would record this call (else impl runs without an autograd.Function: same result,
        no graph). Under functorch transforms the Function is kept, so they work or fail as with any Function."""
        if torch.is_grad_enabled():
            for i in self.diff:
                t = args[i]
                if t is not None and t.requires_grad:
                    return True
        return _functorch_active()

    # ---- autograd, as registered with torch.library -----------------------------------------------------
    def _op_setup(self, ctx, inputs, output):
        ctx.eager = False
        ctx.needs = self.unflatten(tuple(ctx.needs_input_grad))  # per Python-level argument (a group: a tuple)
        self.setup(ctx, self.unflatten(tuple(inputs)), output)

    def _op_backward(self, ctx, *grads):
        g = self.backward(ctx, *grads)
        if not self._groups:
            return g
        out, last = [], 0
        for i, _, grp in self._groups:  # a group (a frozen weight) has no gradient
            out += g[last:i]
            out += [None] * len(grp._fields)
            last = i + 1
        out += g[last:]
        return tuple(out)


def _function(op: Op, holder: bool):
    """The eager autograd.Function of an op, from its impl / setup / backward. With non-differentiable outputs
    (LoRA's xa, RMSNorm's rstd) it returns the differentiable one only (an autograd output costs ~10-20 us per
    call); with `holder`, it takes a list after the op's arguments and puts the full output in it."""
    assert op._diff_outputs == (0,), "one differentiable output per op, the first"
    nondiff = op.nondiff_outputs
    pad = (None,) * len(nondiff)
    extra = (None,) if holder else ()

    def forward(ctx, *args):
        if holder:
            box = args[-1]
            args = args[:-1]
        out = op.impl(*args)
        op.setup(ctx, args, out)
        if not nondiff:
            return out
        if holder:
            box.append(out)
        return out[0]

    once = _once(op.backward)

    def backward(ctx, grad):
        # once_differentiable's wrapper (no_grad + checks) only matters for create_graph=True: skip it otherwise
        g = op.backward(ctx, grad, *pad) if not torch.is_grad_enabled() else once(ctx, grad, *pad)
        return (*g, *extra) if holder else g

    fn = type(f"{op.name}_Function", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    # what setup/backward read from ctx, as class attributes of the eager ctx (nothing set per call)
    fn._backward_cls.eager = True
    fn._backward_cls.needs = property(lambda ctx: ctx.needs_input_grad)  # (+ the holder's, at the end)
    return fn


def randn(seed: int, *shape: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> Tensor:
    """Reproducible normal samples (for the ops' sample inputs): float32 draws, scaled, then cast."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


__all__ = ["Op", "REGISTRY", "randn"]
