"""The paging engine of PagedAdamW: optimizer states in pinned host memory, moved
through a double-buffered GPU staging area on side streams.

For each chunk i of the flat host state (exp_avg and exp_avg_sq, float32):
  h2d stream : wait free[b]    -> copy host[i] -> stage[b]        -> record loaded[b]
  main stream: wait loaded[b]  -> fused adamw_step_ on stage[b]   -> record updated[b]
  d2h stream : wait updated[b] -> copy stage[b] -> host[i]        -> record free[b]
with b = i % 2, so the upload of chunk i+1 and the download of chunk i-1 overlap the
update of chunk i (H2D and D2H use separate copy engines). Nothing waits on the host;
`synchronize()` does, before the host reads the states.

The same engine runs on CPU parameters with no-op streams (used by the tests to exercise
the chunking on machines without a GPU).
"""
from __future__ import annotations

import contextlib

import torch

from ..ops.optim import adamw_step_eager

_ALIGN = 4  # elements: keeps every slice 16-byte aligned for the vectorised kernel


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class PagedStates:
    """Host (pinned) states of a set of CUDA parameters of one device, paged chunk by chunk."""

    def __init__(self, device: torch.device, params: list[torch.Tensor], chunk_elems: int):
        self.device = device
        self.offsets: dict[torch.Tensor, int] = {}
        off = 0
        for p in params:
            self.offsets[p] = off
            off += _align(p.numel(), _ALIGN)
        self.total = off
        self.cuda = device.type == "cuda"
        # [exp_avg, exp_avg_sq]: pinned, so that the copies below are truly asynchronous
        self.host = torch.zeros(2, max(off, 1), dtype=torch.float32, pin_memory=self.cuda)
        self.chunk_elems = max(_ALIGN * 16, min(_align(chunk_elems, 64), _align(off, 64)))
        self.stage = torch.empty(2, 2, self.chunk_elems, dtype=torch.float32, device=device)
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
            # the caching allocator must not hand the staging memory out again (when this object dies)
            # before the side streams' last copies are done
            self.stage.record_stream(self.h2d)
            self.stage.record_stream(self.d2h)
            self.loaded, self.updated, self.free = ([torch.cuda.Event() for _ in range(2)] for _ in range(3))
        # chunk -> [(param, offset in param, offset in chunk, n)], fixed for the life of the layout
        self.chunks: list[tuple[int, int, list[tuple[torch.Tensor, int, int, int]]]] = []
        for start in range(0, off, self.chunk_elems):
            end = min(off, start + self.chunk_elems)
            segs = []
            for p in params:
                po, pn = self.offsets[p], p.numel()
                a, b = max(start, po), min(end, po + pn)
                if a < b:
                    segs.append((p, a - po, a - start, b - a))
            self.chunks.append((start, end, segs))
        self.last_h2d_bytes = 0
        self.last_d2h_bytes = 0

    def state_views(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o, n = self.offsets[p], p.numel()
        return self.host[0, o:o + n].view(p.shape), self.host[1, o:o + n].view(p.shape)

    @property
    def host_bytes(self) -> int:
        return self.host.numel() * 4

    @property
    def staging_bytes(self) -> int:
        return self.stage.numel() * 4

    def step(self, work: dict[torch.Tensor, tuple[torch.Tensor, int, dict]]) -> None:
        """One AdamW step of the paged parameters in `work`: param -> (grad, step, group)."""
        if not self.cuda:
            return self._step_cpu(work)
        main = torch.cuda.current_stream(self.device)
        h2d_bytes = d2h_bytes = 0
        i = 0
        for start, end, segs in self.chunks:
            todo = [s for s in segs if s[0] in work]
            if not todo:
                continue
            b, n = i % 2, end - start
            i += 1
            self.h2d.wait_event(self.free[b])
            with torch.cuda.stream(self.h2d):
                for k in range(2):  # contiguous 1-d slices: a pinned, truly asynchronous copy each
                    self.stage[b, k, :n].copy_(self.host[k, start:end], non_blocking=True)
                self.loaded[b].record(self.h2d)
            main.wait_event(self.loaded[b])
            self._update(todo, work, b)
            self.updated[b].record(main)
            self.d2h.wait_event(self.updated[b])
            with torch.cuda.stream(self.d2h):
                for k in range(2):
                    self.host[k, start:end].copy_(self.stage[b, k, :n], non_blocking=True)
                self.free[b].record(self.d2h)
            h2d_bytes += 2 * n * 4
            d2h_bytes += 2 * n * 4
        self.last_h2d_bytes, self.last_d2h_bytes = h2d_bytes, d2h_bytes

    def _update(self, todo, work, b: int) -> None:
        """The fused update of one staged chunk: one op call per param group present in it."""
        by_group: dict[int, tuple[dict, list]] = {}
        for p, po, co, sn in todo:
            g, st, group = work[p]
            by_group.setdefault(id(group), (group, []))[1].append((p, g, po, co, sn, st))
        for group, items in by_group.values():
            beta1, beta2 = group["betas"]
            adamw_step_eager(
                [p.view(-1)[po:po + sn] for p, g, po, co, sn, st in items],
                [g.view(-1)[po:po + sn] for p, g, po, co, sn, st in items],
                [self.stage[b, 0, co:co + sn] for p, g, po, co, sn, st in items],
                [self.stage[b, 1, co:co + sn] for p, g, po, co, sn, st in items],
                [st for *_, st in items],
                float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), bool(group["maximize"]),
            )

    def _step_cpu(self, work) -> None:
        """The same chunk walk with synchronous copies (no streams): for tests without a GPU."""
        moved = i = 0
        for start, end, segs in self.chunks:
            todo = [s for s in segs if s[0] in work]
            if not todo:
                continue
            b, n = i % 2, end - start
            i += 1
            self.stage[b, :, :n].copy_(self.host[:, start:end])
            self._update(todo, work, b)
            self.host[:, start:end].copy_(self.stage[b, :, :n])
            moved += 2 * n * 4
        self.last_h2d_bytes = self.last_d2h_bytes = moved

    def synchronize(self) -> None:
        """Block the host until every paged copy has landed in host memory."""
        if self.cuda:
            self.d2h.synchronize()
