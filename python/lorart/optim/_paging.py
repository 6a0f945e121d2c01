"""The paging engine of PagedAdamW: optimizer states in pinned host memory, moved
through a double-buffered GPU staging area on side streams.

A StateLayout says how one kind of state sits in flat buffers: float32 exp_avg/exp_avg_sq
(LAYOUT32), or 8-bit codes plus one float32 absmax per 256 elements (LAYOUT8). Each kind
pages as a set of "planes" (per plane a [2, L] buffer: row 0 for exp_avg, row 1 for
exp_avg_sq). For each chunk i of the flat host state:
  h2d stream : wait free[b]    -> copy host[i] -> stage[b]        -> record loaded[b]
  main stream: wait loaded[b]  -> fused AdamW step on stage[b]    -> record updated[b]
  d2h stream : wait updated[b] -> copy stage[b] -> host[i]        -> record free[b]
with b = i % 2, so the upload of chunk i+1 and the download of chunk i-1 overlap the
update of chunk i (H2D and D2H use separate copy engines). Nothing waits on the host;
`synchronize()` does, before the host reads the states.

The same engine runs on CPU parameters with no-op streams (used by the tests to exercise
the chunking on machines without a GPU).
"""
from __future__ import annotations

import torch

from ..dtensor import local_of
from ..ops.optim import BLOCK, adamw8_step_, adamw_step_


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _hparams(group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    return (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            bool(group["maximize"]))


class StateLayout:
    """One kind of AdamW state: its planes, alignment, sizes, views and fused step."""

    bits: int
    align: int          # elements: every parameter's offset (and every chunk boundary) is a multiple
    planes: tuple       # per plane (dtype, elements per entry): a [2, total // div] buffer
    state_elem_bytes: int  # bytes of one state per element, without the absmax (page_chunk_bytes counts these)

    def nbytes(self, numel: int) -> int:
        """Bytes of both states of `numel` elements, as laid out (absmax included)."""
        return sum(2 * dt.itemsize * -(-numel // div) for dt, div in self.planes)

    def zeros(self, p: torch.Tensor) -> tuple:
        """Resident (unpaged) states of p."""
        raise NotImplementedError

    def views(self, planes: list[torch.Tensor], off: int, n: int, shape) -> tuple:
        """The state tensors of n elements at element offset `off` of buffers `planes`."""
        raise NotImplementedError

    def step(self, params: list, grads: list, states: list[tuple], steps: list[int], group: dict) -> None:
        raise NotImplementedError


class _Layout32(StateLayout):
    bits, align, planes, state_elem_bytes = 32, 4, ((torch.float32, 1),), 4  # 16-byte aligned slices

    def zeros(self, p):
        return (torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                torch.zeros(p.shape, dtype=torch.float32, device=p.device))

    def views(self, planes, off, n, shape):
        return planes[0][0, off:off + n].view(shape), planes[0][1, off:off + n].view(shape)

    def step(self, params, grads, states, steps, group):
        adamw_step_(params, grads, [s[0] for s in states], [s[1] for s in states], steps, *_hparams(group))


class _Layout8(StateLayout):
    bits, align, planes, state_elem_bytes = 8, BLOCK, ((torch.uint8, 1), (torch.float32, BLOCK)), 1

    def zeros(self, p):
        nb = -(-p.numel() // BLOCK)
        return (torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
                torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
                torch.zeros(nb, dtype=torch.float32, device=p.device),
                torch.zeros(nb, dtype=torch.float32, device=p.device))

    def views(self, planes, off, n, shape):
        q, a = planes
        b, nb = off // BLOCK, -(-n // BLOCK)
        return (q[0, off:off + n].view(shape), q[1, off:off + n].view(shape), a[0, b:b + nb], a[1, b:b + nb])

    def step(self, params, grads, states, steps, group):
        adamw8_step_(params, grads, *([s[k] for s in states] for k in range(4)), steps, *_hparams(group))


LAYOUT32 = _Layout32()
LAYOUT8 = _Layout8()


def plan(params: list[torch.Tensor], chunk_elems: int, layout: StateLayout) -> tuple[dict, int]:
    """Offsets of the parameters in the flat buffers and the elements per chunk."""
    offsets, off = {}, 0
    for p in params:
        offsets[p] = off
        off += _align(local_of(p).numel(), layout.align)
    q = max(64, layout.align)
    return offsets, max(q, min(_align(chunk_elems, q), _align(off, q)))


def staging_bytes(params: list[torch.Tensor], chunk_elems: int, layout: StateLayout) -> int:
    """GPU bytes of the double-buffered staging area PagedStates(params, chunk_elems, layout) allocates."""
    chunk = plan(params, chunk_elems, layout)[1]
    return sum(2 * 2 * (chunk // div) * dt.itemsize for dt, div in layout.planes)


class PagedStates:
    """Host (pinned) states of one layout for a set of parameters of one device, paged chunk by chunk."""

    def __init__(self, device: torch.device, params: list[torch.Tensor], chunk_elems: int, layout: StateLayout):
        self.device = device
        self.layout = layout
        self.offsets, self.chunk_elems = plan(params, chunk_elems, layout)
        self.total = off = sum(_align(local_of(p).numel(), layout.align) for p in params)
        self.cuda = device.type == "cuda"
        # pinned, so that the copies below are truly asynchronous
        self.host = [torch.zeros(2, max(off // div, 1), dtype=dt, pin_memory=self.cuda) for dt, div in layout.planes]
        self.stage = [torch.empty(2, 2, self.chunk_elems // div, dtype=dt, device=device) for dt, div in layout.planes]
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
            # the caching allocator must not hand the staging memory out again (when this object dies)
            # before the side streams' last copies are done
            for st in self.stage:
                st.record_stream(self.h2d)
                st.record_stream(self.d2h)
            self.loaded, self.updated, self.free = ([torch.cuda.Event() for _ in range(2)] for _ in range(3))
        # chunk -> [(param, offset in param, offset in chunk, n)], fixed for the life of the layout
        self.chunks: list[tuple[int, int, list[tuple[torch.Tensor, int, int, int]]]] = []
        for start in range(0, off, self.chunk_elems):
            end = min(off, start + self.chunk_elems)
            segs = []
            for p in params:
                po, pn = self.offsets[p], local_of(p).numel()
                a, b = max(start, po), min(end, po + pn)
                if a < b:
                    segs.append((p, a - po, a - start, b - a))
            self.chunks.append((start, end, segs))
        self.last_h2d_bytes = 0
        self.last_d2h_bytes = 0

    def state_views(self, p: torch.Tensor) -> tuple:
        lp = local_of(p)
        return self.layout.views(self.host, self.offsets[p], lp.numel(), lp.shape)

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.host)

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.stage)

    def _copies(self, start: int, end: int, b: int, to_stage: bool) -> int:
        """Copies chunk [start, end) between host and staging buffer b, one contiguous 1-d slice per
        plane and state (a pinned, truly asynchronous copy each). Returns the bytes moved."""
        moved = 0
        for (dt, div), h, st in zip(self.layout.planes, self.host, self.stage):
            s, e = start // div, -(-end // div)
            for k in range(2):
                src, dst = (h[k, s:e], st[b, k, :e - s]) if to_stage else (st[b, k, :e - s], h[k, s:e])
                dst.copy_(src, non_blocking=self.cuda)
                moved += (e - s) * h.element_size()
        return moved

    def step(self, work: dict[torch.Tensor, tuple[torch.Tensor, int, dict]]) -> None:
        """One AdamW step of the paged parameters in `work`: param -> (grad, step, group)."""
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        h2d_bytes = d2h_bytes = 0
        i = 0
        for start, end, segs in self.chunks:
            todo = [s for s in segs if s[0] in work]
            if not todo:
                continue
            b = i % 2
            i += 1
            if not self.cuda:  # the same chunk walk with synchronous copies (tests without a GPU)
                h2d_bytes += self._copies(start, end, b, True)
                self._update(todo, work, b)
                d2h_bytes += self._copies(start, end, b, False)
                continue
            self.h2d.wait_event(self.free[b])
            with torch.cuda.stream(self.h2d):
                h2d_bytes += self._copies(start, end, b, True)
                self.loaded[b].record(self.h2d)
            main.wait_event(self.loaded[b])
            self._update(todo, work, b)
            self.updated[b].record(main)
            self.d2h.wait_event(self.updated[b])
            with torch.cuda.stream(self.d2h):
                d2h_bytes += self._copies(start, end, b, False)
                self.free[b].record(self.d2h)
        self.last_h2d_bytes, self.last_d2h_bytes = h2d_bytes, d2h_bytes

    def _update(self, todo, work, b: int) -> None:
        """The fused update of one staged chunk: one call per param group present in it."""
        by_group: dict[int, tuple[dict, list]] = {}
        for p, po, co, sn in todo:
            g, st, group = work[p]
            by_group.setdefault(id(group), (group, []))[1].append((p, g, po, co, sn, st))
        stage = [s[b] for s in self.stage]
        for group, items in by_group.values():
            self.layout.step([local_of(p).view(-1)[po:po + sn] for p, g, po, co, sn, st in items],
                             [g.view(-1)[po:po + sn] for p, g, po, co, sn, st in items],
                             [self.layout.views(stage, co, sn, (sn,)) for p, g, po, co, sn, st in items],
                             [st for *_, st in items], group)

    def synchronize(self) -> None:
        """Block the host until every paged copy has landed in host memory."""
        if self.cuda:
            self.d2h.synchronize()
