"""LoRALinear: LoRA / QLoRA adapters on an ``nn.Linear`` or an NF4 linear (lorart.nn.NF4Linear).

    y = base(x) + scaling * B(A(dropout(x)))        scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

PEFT's init (A: kaiming-uniform a=sqrt(5), B: zeros) and in-memory layout (``lora_A[name].weight`` [r, in],
``lora_B[name].weight`` [out, r]). Several named adapters per layer (``add_adapter``, ``set_adapter``,
``disable_adapters``) and per-row adapter selection for mixed batches (``adapter_ids``, the grouped op; per
call, per thread or per layer: lorart.nn.selection).

Merging: a float base gets ``W += scaling * B @ A`` (lorart::lora_merge_, one rounding per element) after a
copy of the original W is kept (on the host by default: ``keep_original="host"``, or "device"), so
``unmerge`` restores W bit-exactly for any number of cycles. An NF4 base is never modified: merging builds
``dequant(W4) + scaling * B @ A`` in the compute dtype (the weight the adapter was trained against) and
unmerging drops it; ``merge_to_nf4`` re-quantizes for export and reports the error it introduces.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor, nn

from ..ops import lora as lops
from ..ops.lora_extra import lora_grouped_add_, lora_merge_, lora_merge_nonfinite
from .nf4_linear import NF4Linear
from .selection import MUTATION_LOCK, SELECTIONS, RowSelection, row_indices

_SEED_BOUND = 1 << 62
_tls = threading.local()


def _draw_seed() -> int:
    """A dropout-mask seed from torch's default generator (so torch.manual_seed reproduces the masks): the
    draw of ``torch.randint(0, 2**62, (1,))`` (same values), into a reused per-thread scalar."""
    if torch.compiler.is_compiling():
        return int(torch.randint(0, _SEED_BOUND, (1,)).item())
    buf = getattr(_tls, "seed", None)
    if buf is None:
        with torch.inference_mode(False):  # a normal tensor even when first drawn under inference_mode
            buf = _tls.seed = torch.empty((), dtype=torch.int64)
    return buf.random_(0, _SEED_BOUND).item()


def nf4_weight_of(base: nn.Module):
    """The NF4Weight (NF4 contract: ``op_args()``, ``dequantize``) held by an NF4 linear, else None."""
    for attr in ("weight", "nf4_weight", "qweight"):
        w = getattr(base, attr, None)
        if w is not None and hasattr(w, "op_args") and not isinstance(w, Tensor):
            return w
    return None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, adapter_name: str = "default", train_bias: bool = False,
                 init: bool = True):
        super().__init__()
        nf4 = nf4_weight_of(base)
        if not isinstance(base, nn.Linear) and nf4 is None:
            raise TypeError(f"lorart: LoRALinear: argument `base`: expected an nn.Linear or an NF4 linear "
                            f"(lorart.nn.NF4Linear), got {type(base).__name__}")
        self.base_layer = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.adapter_ids: Tensor | list | None = None  # the layer's per-row adapter selection, for every thread
        self._original: Tensor | None = None            # the float base before merging (exact unmerge)
        self._merged_dense: Tensor | None = None        # NF4 base: dequant(W4) + deltas while merged
        self._original_nf4 = None                        # NF4 base before a requantizing merge
        self._stack_cache = None
        self._ids_cache = None
        if getattr(base, "bias", None) is not None:
            base.bias.requires_grad_(bool(train_bias))
        self.add_adapter(adapter_name, r, alpha, dropout, rslora, init=init)

    # ---- adapters ---------------------------------------------------------------------------------------------
    @property
    def is_nf4(self) -> bool:
        return nf4_weight_of(self.base_layer) is not None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def _param_dtype_device(self):
        if self.is_nf4:
            w = nf4_weight_of(self.base_layer)
            dev = w.packed.device
            dt = w.dtype if w.dtype.is_floating_point else torch.float32
            return dt, dev
        return self.base_layer.weight.dtype, self.base_layer.weight.device

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False,
                    init: bool = True, dtype: torch.dtype | None = None, activate: bool = True,
                    weights: tuple[Tensor, Tensor] | None = None, trainable: bool = True) -> None:
        """Add adapter `name` (PEFT init: A kaiming-uniform a=sqrt(5), B zeros; or `weights` = (A, B) copied in)
        and, when `activate`, make it active; its weights require grad when `trainable`. A forward in another
        thread sees the adapter complete (weights and flags) or not at all."""
        with MUTATION_LOCK:
            self._add_adapter(name, r, alpha, dropout, rslora, init, dtype, activate, weights, trainable)

    def _add_adapter(self, name, r, alpha, dropout, rslora, init, dtype, activate, weights, trainable) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"lorart: add_adapter: argument `name`: expected a non-empty name without '.', got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"lorart: add_adapter: adapter {name!r} already exists (have {self.adapter_names})")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"lorart: add_adapter: argument `r`: expected a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lorart: add_adapter: argument `dropout`: expected [0, 1), got {dropout}")
        pdt, dev = self._param_dtype_device()
        dt = dtype or (pdt if pdt != torch.float64 else torch.float64)
        A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dt)
        B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dt)
        if weights is not None:
            with torch.no_grad():
                A.weight.copy_(weights[0].to(dt))
                B.weight.copy_(weights[1].to(dt))
        elif init:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        A.weight.requires_grad_(trainable)
        B.weight.requires_grad_(trainable)
        # published last: `adapter_names` (lora_A's keys) lists the adapter only once everything is in place
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = r, float(alpha), float(dropout)
        self.use_rslora[name] = bool(rslora)
        self.scaling[name] = lops.lora_scale(alpha, r, rslora)
        self.lora_B[name] = B
        self.lora_A[name] = A
        if activate:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        with MUTATION_LOCK:
            self._require(name)
            if name in self.merged_adapters:
                raise ValueError(f"lorart: delete_adapter: adapter {name!r} is merged; unmerge first")
            if self.active_adapter == name:
                self.active_adapter = next((n for n in self.lora_A.keys() if n != name), None)
            for d in (self.lora_A, self.lora_B):  # lora_A first: `adapter_names` stops listing it at once
                del d[name]
            for d in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling):
                d.pop(name)
            self._stack_cache = None

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"lorart: no adapter named {name!r} in this layer (have {self.adapter_names})")

    def set_adapter(self, name: str) -> None:
        self._require(name)
        self.active_adapter = name
        self.disabled = False

    def disable_adapters(self) -> None:
        self.disabled = True

    def enable_adapters(self) -> None:
        self.disabled = False

    # ---- forward ----------------------------------------------------------------------------------------------
    def _ab(self, name: str, dtype: torch.dtype):
        return self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)

    def _base_forward(self, x: Tensor) -> Tensor:
        if self._merged_dense is not None:
            return nn.functional.linear(x, self._merged_dense, self.base_layer.bias)
        return self.base_layer(x)

    def forward(self, x: Tensor, adapter_ids=None) -> Tensor:
        """``adapter_ids``: per-row adapters for this call (see lorart.nn.selection); else this thread's
        `lorart.adapter_ids` block, else the layer's ``adapter_ids``, else the active adapter."""
        if adapter_ids is None:
            adapter_ids = self.adapter_ids
            if SELECTIONS.active:  # some thread or task is inside a `lorart.adapter_ids` block
                adapter_ids = SELECTIONS.lookup(self, adapter_ids)
        name = self.active_adapter
        if self.disabled or adapter_ids is not None or self.merged_adapters or name is None:
            return self._forward_special(x, adapter_ids)
        # the per-call path: plain dict lookups, no casts of tensors already in the right dtype
        p = self.lora_dropout[name] if self.training else 0.0
        seed = _draw_seed() if p > 0 else 0
        mods = self._modules
        base = mods["base_layer"]
        A, B = mods["lora_A"][name].weight, mods["lora_B"][name].weight
        kind = type(base)
        if kind is nn.Linear:
            nf4 = None
        elif kind is NF4Linear:  # looked up per call: a moved or swapped weight (`_set_weight`) is seen
            nf4 = base.weight
        else:  # any other base: the NF4 contract's weight, looked up per call
            nf4 = nf4_weight_of(base)
        bias = base.bias
        xdt = x.dtype
        if nf4 is not None:
            dt = x.dtype if x.dtype != torch.float64 else torch.float32
            if x.dtype != dt:
                x = x.to(dt)
            if bias is not None and bias.dtype != dt:
                bias = bias.to(dt)
        else:
            W = base.weight
            dt = W.dtype
            if x.dtype != dt:
                x = x.to(dt)
        if A.dtype != dt:
            A = A.to(dt)
        if B.dtype != dt:
            B = B.to(dt)
        if nf4 is not None:  # the result in the input's dtype, as NF4Linear and bnb's Linear4bit (which PEFT keeps)
            y = lops.lora_linear_nf4(x, nf4, bias, A, B, self.scaling[name], p, seed)
            return y if y.dtype == xdt else y.to(xdt)
        return lops.lora_linear(x, W, bias, A, B, self.scaling[name], p, seed)

    def _forward_special(self, x: Tensor, adapter_ids) -> Tensor:
        """Disabled, mixed-batch, merged or no active adapter."""
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self._base_forward(x)
        if adapter_ids is not None:
            return self._forward_mixed(x, adapter_ids)
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return self._base_forward(x)
        raise RuntimeError(f"lorart: adapters {self.merged_adapters} are merged while {name!r} is active: "
                           "unmerge first")

    def _stacks(self, names: list[str], dtype, device):
        # parameter versions only grow, so their sum changes whenever any adapter weight is written
        ws = [self.lora_A[n].weight for n in names] + [self.lora_B[n].weight for n in names]
        key = (tuple(names), dtype, device, tuple(id(w) for w in ws), sum(w._version for w in ws),
               tuple(self.scaling[n] for n in names))
        c = self._stack_cache   # read once: another thread may replace it (one tuple, replaced whole)
        if c is not None and c[0] == key:
            return c[1]
        rmax = max(self.r[n] for n in names)
        A = torch.zeros(len(names), rmax, self.in_features, dtype=dtype, device=device)
        B = torch.zeros(len(names), self.out_features, rmax, dtype=dtype, device=device)
        with torch.no_grad():
            for i, n in enumerate(names):
                A[i, :self.r[n]] = self.lora_A[n].weight
                B[i, :, :self.r[n]] = self.lora_B[n].weight
        ranks = torch.tensor([self.r[n] for n in names], dtype=torch.int32, device=device)
        scales = torch.tensor([self.scaling[n] for n in names], dtype=torch.float32, device=device)
        val = (A, B, ranks, scales)
        self._stack_cache = (key, val)
        return val

    def row_indices(self, ids, rows: int, batch: int) -> Tensor:
        """Per-row adapter indices (into adapter_names; -1 = none) from names/None or ints per row or per batch."""
        return row_indices(ids, self.adapter_names, rows, batch)

    def _forward_mixed(self, x: Tensor, ids) -> Tensor:
        if self.merged_adapters:
            raise RuntimeError("lorart: mixed-adapter batches need unmerged adapters: call unmerge() first")
        y = self._base_forward(x)
        rows = x.numel() // self.in_features
        batch = x.shape[0] if x.dim() > 1 else 1
        names = tuple(self.lora_A.keys())  # one snapshot for the indices and the stacks
        if isinstance(ids, RowSelection):  # a `lorart.adapter_ids` block: converted and cached by the block
            idx = ids.indices(names, rows, batch, x.device)
        else:
            # converted once per ids object and layer, not once per forward; the cache holds `ids` itself, so
            # its id() cannot be reused by another object while cached (one tuple, replaced whole)
            key = (ids._version if isinstance(ids, Tensor) else tuple(ids), rows, batch, x.device, names)
            c = self._ids_cache
            if c is not None and c[0] is ids and c[1] == key:
                idx = c[2]
            else:
                idx = row_indices(ids, list(names), rows, batch).to(x.device, non_blocking=True)
                self._ids_cache = (ids, key, idx)
        y2 = y.reshape(rows, self.out_features)
        A, B, ranks, scales = self._stacks(list(names), y.dtype, x.device)
        lora_grouped_add_(y2, x.reshape(rows, -1).to(y.dtype), A, B, ranks, scales, idx)
        return y2.view(y.shape)

    # ---- merge ------------------------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = True,
              keep_original: str = "host", requantize: bool = False) -> dict | None:
        """Merge adapters into the base for zero-overhead inference. Float base: W += scaling * B @ A with the
        original kept (``keep_original``: "host" (pinned CPU copy when W is on CUDA) or "device") so that
        ``unmerge`` is bit-exact. NF4 base: a dense dequant(W4) + deltas is built; the packed weight stays.
        ``safe_merge``: refuse (ValueError, weight untouched) when the result would hold NaN/inf.
        ``requantize`` (NF4 base, for export): the merged weight is quantized back to NF4 and becomes the base's
        weight (the previous NF4 weight is kept, so unmerge still restores it exactly); returns the error this
        introduces against the dense merged weight: max_abs_error, rel_error (Frobenius, relative to the merged
        weight) and delta_rel_error (relative to the adapter's delta scaling * B @ A)."""
        names = adapter_names if adapter_names is not None else [self.active_adapter] if self.active_adapter else []
        if keep_original not in ("host", "device"):
            raise ValueError(f"lorart: merge: argument `keep_original`: expected 'host' or 'device', got {keep_original!r}")
        for n in names:
            self._require(n)
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        nf4 = nf4_weight_of(self.base_layer)
        with torch.no_grad():
            if nf4 is not None:
                W = self._merged_dense if self._merged_dense is not None else nf4.dequantize(nf4.dtype)
                work = W.clone() if self._merged_dense is not None else W
            else:
                W = self.base_layer.weight.data
                work = W.clone() if safe_merge and len(names) > 1 else W
            for n in names:
                A, B = self._ab(n, work.dtype)
                if safe_merge:
                    bad = int(lora_merge_nonfinite(work, A, B, self.scaling[n]))
                    if bad:
                        raise ValueError(f"lorart: merge: merging adapter {n!r} would give {bad} NaN/inf weights "
                                         "(the weight was left untouched)")
                if work is W and nf4 is None and self._original is None:
                    self._keep_original(W, keep_original)
                lora_merge_(work, A, B, self.scaling[n])
            if nf4 is not None and requantize:
                self.merged_adapters.extend(names)
                return self._requantize(nf4, work)
            if nf4 is not None:
                self._merged_dense = work
            elif work is not W:
                if self._original is None:
                    self._keep_original(W, keep_original)
                W.copy_(work)
        self.merged_adapters.extend(names)

    def _requantize(self, nf4, merged: Tensor) -> dict:
        from .. import nf4 as _nf4

        if not hasattr(self.base_layer, "_set_weight"):
            raise TypeError(f"lorart: merge(requantize=True): {type(self.base_layer).__name__} cannot take a new "
                            "NF4 weight (expected lorart.nn.NF4Linear)")
        q = _nf4.quantize(merged, blocksize=nf4.blocksize, double_quant=nf4.double_quant)
        q.dtype = nf4.dtype
        err = q.dequantize(torch.float32) - merged.float()
        delta = merged.float() - nf4.dequantize(torch.float32)
        report = {"max_abs_error": err.abs().max().item(),
                  "rel_error": (err.norm() / merged.float().norm().clamp_min(1e-30)).item(),
                  "delta_rel_error": (err.norm() / delta.norm().clamp_min(1e-30)).item()}
        self._original_nf4 = nf4
        self.base_layer._set_weight(q)
        return report

    def _keep_original(self, W: Tensor, where: str) -> None:
        if where == "host" and W.is_cuda:
            self._original = torch.empty(W.shape, dtype=W.dtype, pin_memory=True)
            self._original.copy_(W)
        else:
            self._original = W.detach().clone()

    def unmerge(self) -> None:
        """Undo every merge: the float base gets its saved original back (bit-exact); an NF4 base drops the
        dense merged weight (the packed weight was never modified)."""
        if not self.merged_adapters:
            return
        with torch.no_grad():
            if self._merged_dense is not None:
                self._merged_dense = None
            if self._original_nf4 is not None:
                self.base_layer._set_weight(self._original_nf4)
                self._original_nf4 = None
            elif self._original is not None:
                self.base_layer.weight.data.copy_(self._original)
                self._original = None
        self.merged_adapters = []

    def merged_memory_bytes(self) -> int:
        """Bytes held to make unmerge exact (the saved original, or the NF4 layer's dense merged weight)."""
        t = self._original if self._original is not None else self._merged_dense
        return 0 if t is None else t.numel() * t.element_size()

    def extra_repr(self) -> str:
        ad = ", ".join(f"{n}: r={self.r[n]} alpha={self.lora_alpha[n]:g}" for n in self.adapter_names)
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4={self.is_nf4}, "
                f"adapters=[{ad}], active={self.active_adapter!r}, merged={self.merged_adapters}")
