"""PagedAdamW: torch.optim.AdamW's update on lorart's fused kernels, with optimizer
states that stay on the GPU while they fit a budget and are paged from pinned host
memory beyond it (see lorart/optim/_paging.py and docs/optim.md)."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from ..ops.optim import adamw_step_eager, check_adamw_hparams
from ._paging import PagedStates

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with float32 states, optionally paged to pinned host memory.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as torch.optim.AdamW (amsgrad is not supported).
        gpu_budget_bytes: GPU memory (per device) that states of CUDA parameters may use, staging included.
            States stay resident while they fit (in parameter order); the rest live in pinned host memory and
            are paged through a double-buffered staging area each step. None: half of the free GPU memory
            when the states are first laid out; 0: page everything.
        page_chunk_bytes: bytes of one state (exp_avg or exp_avg_sq) moved per chunk. None: 1/16 of the paged
            state, clamped to [4 MiB, 64 MiB] (enough chunks for the copies to overlap the updates).
        state_bits: 32 (the only width supported so far).

    The state_dict has torch.optim.AdamW's layout (per parameter `step` (float32 scalar tensor), `exp_avg`,
    `exp_avg_sq`; the same param_group keys), so checkpoints load into either optimizer. NaN or Inf in a
    gradient propagate into that parameter and its states, as in torch (no check, no skip).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 gpu_budget_bytes: int | None = None, page_chunk_bytes: int | None = None,
                 state_bits: int = 32):
        if isinstance(lr, torch.Tensor):
            raise TypeError("lorart: argument `lr`: expected a Python float, got a Tensor")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"lorart: argument `betas`: expected a pair (beta1, beta2), got {betas!r}")
        check_adamw_hparams(lr, betas[0], betas[1], eps, weight_decay)
        if amsgrad:
            raise ValueError("lorart: argument `amsgrad`: PagedAdamW does not support amsgrad=True")
        if state_bits != 32:
            raise ValueError(f"lorart: argument `state_bits`: expected 32 (8-bit states are not implemented yet), "
                             f"got {state_bits!r}")
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
        self._storage: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._pools: dict[torch.device, PagedStates] = {}
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

    def _build_layout(self, sources: dict[torch.Tensor, dict] | None = None) -> None:
        """Allocate the states of every parameter (resident or paged) and copy existing values into them."""
        self.synchronize()
        if sources is None:
            sources = {p: s for p, s in self.state.items() if "exp_avg" in s}
        # frozen parameters get no storage (a base model passed whole costs nothing); a parameter that gets
        # a gradient later triggers a new layout
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad or p.grad is not None]
        params = list(dict.fromkeys(params))  # keep order, drop duplicates
        storage: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        paged: dict[torch.device, list[torch.Tensor]] = {}
        by_dev: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f"lorart: PagedAdamW needs contiguous parameters, got one of shape {tuple(p.shape)} "
                                 f"and strides {p.stride()}")
            by_dev.setdefault(p.device, []).append(p)
        for dev, ps in by_dev.items():
            resident = ps
            if dev.type == "cuda" or self._page_cpu:
                resident, paged_ps = self._split_budget(dev, ps)
                if paged_ps:
                    paged[dev] = paged_ps
            for p in resident:
                storage[p] = (torch.zeros(p.shape, dtype=torch.float32, device=dev),
                              torch.zeros(p.shape, dtype=torch.float32, device=dev))
        pools = {dev: PagedStates(dev, ps, self._chunk_elems(ps)) for dev, ps in paged.items()}
        for pool in pools.values():
            for p in pool.offsets:
                storage[p] = pool.state_views(p)
        for p, src in sources.items():
            if p not in storage:
                continue
            m, v = storage[p]
            m.copy_(src["exp_avg"].detach().reshape(p.shape))
            v.copy_(src["exp_avg_sq"].detach().reshape(p.shape))
            step = src.get("step", 0)
            step = float(step.item()) if isinstance(step, torch.Tensor) else float(step)
            self.state[p] = {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": m, "exp_avg_sq": v}
        self._storage, self._pools = storage, pools

    def _chunk_elems(self, ps: list[torch.Tensor]) -> int:
        if self.page_chunk_bytes is not None:
            return self.page_chunk_bytes // 4
        total = sum(p.numel() for p in ps)
        return min(16 << 20, max(1 << 20, total // 16))

    def _split_budget(self, dev: torch.device, ps: list[torch.Tensor]) -> tuple[list, list]:
        need = [8 * p.numel() for p in ps]
        budget = self.gpu_budget_bytes
        if budget is None:
            budget = torch.cuda.mem_get_info(dev)[0] // 2 if dev.type == "cuda" else 1 << 62
        if sum(need) <= budget:
            return ps, []
        staging = 16 * min(self._chunk_elems(ps), sum(p.numel() for p in ps) + 64)
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
        paged_work: dict[torch.device, dict] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            resident: dict[torch.device, tuple[list, list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("lorart: PagedAdamW does not support sparse gradients")
                if g.dtype != p.dtype:
                    raise TypeError(f"lorart: a gradient has dtype {g.dtype}, its parameter {p.dtype}")
                g = g.contiguous()
                state = self.state[p]
                if "exp_avg" not in state:
                    m, v = self._storage[p]
                    state.update(step=torch.tensor(0.0, dtype=torch.float32), exp_avg=m, exp_avg_sq=v)
                state["step"] += 1
                st = int(state["step"].item())
                pool = self._pools.get(p.device)
                if pool is not None and p in pool.offsets:
                    paged_work.setdefault(p.device, {})[p] = (g, st, group)
                    continue
                lists = resident.setdefault(p.device, ([], [], [], [], []))
                for lst, t in zip(lists, (p, g, state["exp_avg"], state["exp_avg_sq"], st)):
                    lst.append(t)
            for ps, gs, ms, vs, sts in resident.values():
                adamw_step_eager(ps, gs, ms, vs, sts, float(group["lr"]), float(beta1), float(beta2),
                            float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"]))
        for dev, work in paged_work.items():
            self._pools[dev].step(work)
        return loss

    # ---- state and reports --------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until paged states have landed in host memory (state_dict() does this itself)."""
        for pool in getattr(self, "_pools", {}).values():
            pool.synchronize()

    def state_dict(self) -> dict[str, Any]:
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a PagedAdamW or torch.optim.AdamW state_dict. States are copied straight into this optimizer's
        storage (pinned host memory for paged parameters): they never pass through the GPU in full."""
        saved_groups = state_dict["param_groups"]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        sources: dict[torch.Tensor, dict] = {}
        saved_state = state_dict["state"]
        for sg, g in zip(saved_groups, self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                if pid in saved_state:
                    sources[p] = saved_state[pid]
        self.state.clear()
        self._build_layout(sources)

    def memory_report(self) -> dict[str, int]:
        """Bytes of state on the host and on the GPU, and the paged traffic of the last step."""
        rep = dict(host_state_bytes=0, gpu_state_bytes=0, gpu_staging_bytes=0, paged_h2d_bytes_per_step=0,
                   paged_d2h_bytes_per_step=0, resident_params=0, paged_params=0)
        if self._storage is None:
            return rep
        paged = {p for pool in self._pools.values() for p in pool.offsets}
        for p, (m, v) in self._storage.items():
            if p in paged:
                rep["paged_params"] += 1
                continue
            rep["resident_params"] += 1
            rep["gpu_state_bytes" if m.is_cuda else "host_state_bytes"] += (m.numel() + v.numel()) * 4
        for pool in self._pools.values():
            rep["host_state_bytes"] += pool.host_bytes
            rep["gpu_staging_bytes"] += pool.staging_bytes
            rep["paged_h2d_bytes_per_step"] += pool.last_h2d_bytes
            rep["paged_d2h_bytes_per_step"] += pool.last_d2h_bytes
        return rep
