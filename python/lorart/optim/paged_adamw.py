"""PagedAdamW: torch.optim.AdamW's update on lorart's fused kernels, with optimizer
states that stay on the GPU while they fit a budget and are paged from pinned host
memory beyond it (see lorart/optim/_paging.py and docs/optim.md)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..dtensor import local_of
from ..ops.optim import check_adamw_hparams, dynamic_map
from . import _states
from ._paging import LAYOUT8, LAYOUT32, PagedStates, StateLayout, staging_bytes

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with float32 or 8-bit states, optionally paged to pinned host memory.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as torch.optim.AdamW (amsgrad is not supported).
        gpu_budget_bytes: GPU memory (per device) that states of CUDA parameters may use, staging included.
            States stay resident while they fit (in parameter order); the rest live in pinned host memory and
            are paged through a double-buffered staging area each step. None: half of the free GPU memory
            when the states are first laid out; 0: page everything.
        page_chunk_bytes: bytes of one state (exp_avg or exp_avg_sq, without the absmax) moved per chunk.
            None: 1/16 of the paged state, clamped to [4 MiB, 64 MiB] (enough chunks for the copies to overlap).
        state_bits: 32 (float32 states) or 8 (bitsandbytes' blockwise 8-bit states: one byte per element with a
            dynamic code, one float32 absmax per 256 elements; 2 bytes per element instead of 8).
        min_8bit_size: with state_bits=8, tensors with fewer elements keep float32 states (as bitsandbytes).

    state_bits=32: the state_dict has torch.optim.AdamW's layout (per parameter `step` (float32 scalar tensor),
    `exp_avg`, `exp_avg_sq`; the same param_group keys), so checkpoints load into either optimizer.
    state_bits=8: it has bitsandbytes.optim.AdamW8bit's layout (see lorart/optim/_states.py), so checkpoints
    load into either optimizer. load_state_dict takes any of these formats at either width (converting).
    NaN or Inf in a gradient propagate into that parameter and its states, as in torch (no check, no skip);
    with 8-bit states a NaN poisons the absmax of its 256-element block.

    Sharded parameters (FSDP2's DTensors): each rank updates and holds the states of its local shard only (paged
    like any other). With state_bits=32 the state_dict holds them as DTensors with the parameter's placements,
    as torch.optim.AdamW's under FSDP2 (so torch.distributed.checkpoint's helpers gather and shard them); with
    state_bits=8 the blockwise codes are those of the local shard (per-rank state, not portable across world sizes).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 gpu_budget_bytes: int | None = None, page_chunk_bytes: int | None = None,
                 state_bits: int = 32, min_8bit_size: int = 4096):
        if isinstance(lr, torch.Tensor):
            raise TypeError("lorart: argument `lr`: expected a Python float, got a Tensor")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"lorart: argument `betas`: expected a pair (beta1, beta2), got {betas!r}")
        check_adamw_hparams(lr, betas[0], betas[1], eps, weight_decay)
        if amsgrad:
            raise ValueError("lorart: argument `amsgrad`: PagedAdamW does not support amsgrad=True")
        if isinstance(state_bits, bool) or state_bits not in (8, 32):
            raise ValueError(f"lorart: argument `state_bits`: expected 8 or 32, got {state_bits!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"lorart: argument `min_8bit_size`: expected an int >= 0, got {min_8bit_size!r}")
        if gpu_budget_bytes is not None and gpu_budget_bytes < 0:
            raise ValueError(f"lorart: argument `gpu_budget_bytes`: expected None or >= 0, got {gpu_budget_bytes}")
        if page_chunk_bytes is not None and page_chunk_bytes < 4096:
            raise ValueError(f"lorart: argument `page_chunk_bytes`: expected >= 4096, got {page_chunk_bytes}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=maximize, foreach=None, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=True)
        self.gpu_budget_bytes = gpu_budget_bytes
        self.page_chunk_bytes = None if page_chunk_bytes is None else int(page_chunk_bytes)
        self.state_bits = state_bits
        self.min_8bit_size = min_8bit_size
        self._storage: dict[torch.Tensor, tuple[torch.Tensor, ...]] | None = None
        self._pools: dict[tuple[torch.device, int], PagedStates] = {}
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._page_cpu = False  # tests only: apply the budget (and the paging walk) to CPU parameters too
        super().__init__(params, defaults)

    # ---- parameters and layout ------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        check_adamw_hparams(g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"])
        if g.get("amsgrad", False):
            raise ValueError("lorart: argument `amsgrad`: PagedAdamW does not support amsgrad=True")
        for i, p in enumerate(g["params"]):
            if p.device.type not in ("cpu", "cuda"):
                raise ValueError(f"lorart: parameter {i} of param group {len(self.param_groups) - 1} is on "
                                 f"{p.device}; PagedAdamW supports cpu and cuda parameters")
            if p.dtype not in _FLOAT:
                raise TypeError(f"lorart: parameter {i} of param group {len(self.param_groups) - 1}: expected dtype "
                                f"float32|bfloat16|float16, got {p.dtype}")
        self._drop_layout()

    def _drop_layout(self) -> None:
        self.synchronize()
        self._storage = None
        self._pools = {}

    def _layout_of(self, p: torch.Tensor) -> StateLayout:  # by the whole parameter's size, sharded or not
        return LAYOUT8 if self.state_bits == 8 and p.numel() >= self.min_8bit_size else LAYOUT32

    def _qmaps_on(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if dev not in self._qmaps:
            self._qmaps[dev] = (dynamic_map(True).to(dev), dynamic_map(False).to(dev))
        return self._qmaps[dev]

    def _build_layout(self, sources: dict[torch.Tensor, dict] | None = None) -> None:
        """Allocate the states of every parameter (resident or paged) and copy existing values into them."""
        self.synchronize()
        if sources is None:
            sources = {p: s for p, s in self.state.items() if "step" in s}
        # frozen parameters get no storage (a base model passed whole costs nothing); a parameter that gets
        # a gradient later triggers a new layout
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad or p.grad is not None]
        params = list(dict.fromkeys(params))  # keep order, drop duplicates
        storage: dict[torch.Tensor, tuple[torch.Tensor, ...]] = {}
        by_dev: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            lp = local_of(p)
            if not lp.is_contiguous():
                raise ValueError(f"lorart: PagedAdamW needs contiguous parameters, got one of shape {tuple(lp.shape)} "
                                 f"and strides {lp.stride()}")
            by_dev.setdefault(lp.device, []).append(p)
        pools: dict[tuple[torch.device, int], PagedStates] = {}
        for dev, ps in by_dev.items():
            resident, paged = ps, []
            if dev.type == "cuda" or self._page_cpu:
                resident, paged = self._split_budget(dev, ps)
            for p in resident:
                storage[p] = self._layout_of(p).zeros(local_of(p))
            for layout in (LAYOUT32, LAYOUT8):
                lps = [p for p in paged if self._layout_of(p) is layout]
                if lps:
                    pools[(dev, layout.bits)] = PagedStates(dev, lps, self._chunk_elems(lps, layout), layout)
        for pool in pools.values():
            for p in pool.offsets:
                storage[p] = pool.state_views(p)
        for p, src in sources.items():
            if p not in storage:
                continue
            where = f"state of parameter {self._index_of(p)}"
            _states.fill(storage[p], self._layout_of(p), src, local_of(p), where)
            self.state[p] = _states.entries(storage[p], self._layout_of(p), self.state_bits,
                                            _states.step_value(src), self._qmaps_on(p.device))
        self._storage, self._pools = storage, pools

    def _index_of(self, p: torch.Tensor) -> str:
        for gi, g in enumerate(self.param_groups):
            for pi, q in enumerate(g["params"]):
                if q is p:
                    return f"{pi} of param group {gi}"
        return "?"

    def _chunk_elems(self, ps: list[torch.Tensor], layout: StateLayout) -> int:
        if self.page_chunk_bytes is not None:
            return self.page_chunk_bytes // layout.state_elem_bytes
        total = sum(local_of(p).numel() for p in ps) * layout.state_elem_bytes
        return min(64 << 20, max(4 << 20, total // 16)) // layout.state_elem_bytes

    def _split_budget(self, dev: torch.device, ps: list[torch.Tensor]) -> tuple[list, list]:
        need = [self._layout_of(p).nbytes(local_of(p).numel()) for p in ps]
        budget = self.gpu_budget_bytes
        if budget is None:
            budget = torch.cuda.mem_get_info(dev)[0] // 2 if dev.type == "cuda" else 1 << 62
        if sum(need) <= budget:
            return ps, []
        staging = 0  # the staging area of every layout that may page (as if all its parameters paged)
        for layout in (LAYOUT32, LAYOUT8):
            lps = [p for p in ps if self._layout_of(p) is layout]
            if lps:
                staging += staging_bytes(lps, self._chunk_elems(lps, layout), layout)
        left = max(0, budget - staging)
        resident, paged = [], []
        for p, n in zip(ps, need):
            if n <= left:
                resident.append(p)
                left -= n
            else:
                paged.append(p)
        return resident, paged

    # ---- the step ---------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._storage is None or any(
                p.grad is not None and p not in self._storage for g in self.param_groups for p in g["params"]):
            self._build_layout()
        paged_work: dict[tuple[torch.device, int], dict] = {}
        for group in self.param_groups:
            resident: dict[tuple[torch.device, StateLayout], tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                pl, g = local_of(p), local_of(p.grad)
                if g.is_sparse:
                    raise RuntimeError("lorart: PagedAdamW does not support sparse gradients")
                if g.dtype != p.dtype:
                    raise TypeError(f"lorart: a gradient has dtype {g.dtype}, its parameter {p.dtype}")
                g = g.contiguous()
                state = self.state[p]
                layout = self._layout_of(p)
                if "step" not in state:
                    state.update(_states.entries(self._storage[p], layout, self.state_bits, 0.0,
                                                 self._qmaps_on(pl.device)))
                state["step"] += 1
                st = int(state["step"])
                key = (pl.device, layout.bits)
                pool = self._pools.get(key)
                if pool is not None and p in pool.offsets:
                    paged_work.setdefault(key, {})[p] = (g, st, group)
                    continue
                lists = resident.setdefault((pl.device, layout), ([], [], [], []))
                for lst, t in zip(lists, (pl, g, self._storage[p], st)):
                    lst.append(t)
            for (dev, layout), (ps, gs, sts, steps) in resident.items():
                layout.step(ps, gs, sts, steps, group)
        for key, work in paged_work.items():
            self._pools[key].step(work)
        return loss

    # ---- state and reports --------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until paged states have landed in host memory (state_dict() does this itself)."""
        for pool in getattr(self, "_pools", {}).values():
            pool.synchronize()

    def state_dict(self) -> dict[str, Any]:
        self.synchronize()
        sd = super().state_dict()
        if self.state_bits == 32:
            _states.as_dtensors(sd["state"], self.param_groups)
        if self.state_bits == 8:  # exactly as bitsandbytes' Optimizer8bit.state_dict()
            sd["state"] = {k: _states.wrap_bnb(v) for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of PagedAdamW (either width), torch.optim.AdamW or bitsandbytes' AdamW8bit /
        PagedAdamW8bit / AdamW. States are converted to this optimizer's width and copied straight into its
        storage (pinned host memory for paged parameters): they never pass through the GPU in full."""
        saved_groups = state_dict["param_groups"]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for g in self.param_groups:  # a checkpoint of another optimizer may lack some of our keys
            for k, v in self.defaults.items():
                g.setdefault(k, v)
            check_adamw_hparams(g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"])
        sources: dict[torch.Tensor, dict] = {}
        saved_state = state_dict["state"]
        for sg, g in zip(saved_groups, self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                if pid in saved_state:
                    sources[p] = saved_state[pid]
        self.state.clear()
        self._build_layout(sources)

    def memory_report(self) -> dict[str, int]:
        """Bytes of state on the host and on the GPU (as laid out: 8 B per element with 32-bit states, 2 B plus
        8 B per 256 elements with 8-bit ones; the 2 KB of code tables per device not counted), and the paged
        traffic of the last step."""
        rep = dict(host_state_bytes=0, gpu_state_bytes=0, gpu_staging_bytes=0, paged_h2d_bytes_per_step=0,
                   paged_d2h_bytes_per_step=0, resident_params=0, paged_params=0)
        if self._storage is None:
            return rep
        paged = {p for pool in self._pools.values() for p in pool.offsets}
        for p, ts in self._storage.items():
            if p in paged:
                rep["paged_params"] += 1
                continue
            rep["resident_params"] += 1
            rep["gpu_state_bytes" if ts[0].is_cuda else "host_state_bytes"] += sum(
                t.numel() * t.element_size() for t in ts)
        for pool in self._pools.values():
            rep["host_state_bytes"] += pool.host_bytes
            rep["gpu_staging_bytes"] += pool.staging_bytes
            rep["paged_h2d_bytes_per_step"] += pool.last_h2d_bytes
            rep["paged_d2h_bytes_per_step"] += pool.last_d2h_bytes
        return rep
