"""Training on several processes and machines with torch.distributed (docs/distributed.md).

`torchrun --nproc-per-node N -m lorart train ...` starts N copies of one run; `Distributed.from_env` joins them in
one process group (NCCL between GPUs, gloo between CPUs). What the recipe asks of it:

- who writes: rank 0 alone (`is_main`); `on_main(fn)` runs fn there and raises its error on every rank;
- agreement: `check_same(facts)` refuses, at the start, ranks whose options, model or data differ; `agree(fn)` runs
  fn on every rank and stops them all when one fails;
- data: every rank builds the same global batches in the same order; `rows(batch)` is this rank's contiguous share
  of one, `share(items)` its share of a list (evaluation);
- gradients: summed over the ranks (DDP with a SUM comm hook; FSDP2 with divide factor 1), so a loss normalised by
  the target tokens of the whole global batch gives exactly the single-process gradient;
- `wrap(model)`: DDP over the trainable parameters, or FSDP2 (`fsdp=True`, training/sharding.py);
- `share_checkpoint`, `full_state`, `load_full`: checkpoints hold whole tensors, whatever the world size;
- failure: `guard(where)` turns a collective that failed because another rank died (gloo sees the closed
  connection at once; NCCL and hung ranks end after `dist_timeout` seconds) into one DistributedError.
With one process and no torchrun every method is the identity: nothing of torch.distributed runs.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..dtensor import local_of
from . import sharding
from .folder import TrainingError


class DistributedError(TrainingError):
    """This rank lost contact with the others (another rank stopped, the network failed, a collective timed out),
    or torch.distributed could not start."""


class RankError(TrainingError):
    """Another rank's error, raised on this rank too so that every rank stops the same way. The CLI prints it
    once, on the rank that raised it first (`reported_by`)."""

    def __init__(self, message: str, reported_by: int):
        super().__init__(message)
        self.reported_by = reported_by


_COMM_FAILURES = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "c10d",
                  "socket", "peer")


def is_comm_failure(e: BaseException) -> bool:
    """A collective that failed for want of its peers (not a bug of the caller)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COMM_FAILURES)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _flatten(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _sum_hook(state: "Distributed", bucket):
    """DDP comm hook: the SUM of the ranks' gradients (DDP's default divides by the world size)."""
    buf = bucket.buffer()
    state.count("allreduce_bytes", buf.numel() * buf.element_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])


class _Ref:
    """A tensor of a shared checkpoint that travels by itself (scattered to the ranks' shards)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


class Distributed:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, *, owns_group: bool = False,
                 device: torch.device = torch.device("cpu"), fsdp: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.owns_group, self.device = owns_group, device
        self.fsdp = fsdp and world_size > 1
        # the bytes of the whole buffers passed to the training steps' collectives so far (DDP: gradients
        # all-reduced; FSDP2: parameters all-gathered, gradients reduce-scattered), and the steps counted
        self.traffic = {"allreduce_bytes": 0, "allgather_bytes": 0, "reduce_scatter_bytes": 0, "counted_steps": 0}
        self.counting = False
        self.fsdp_groups = 0
        self.layout: Optional[dict] = None   # FSDP2: sharding.traffic_layout, what one forward+backward moves

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single(self) -> bool:
        return self.world_size == 1

    @property
    def backend(self) -> Optional[str]:
        return None if self.single else dist.get_backend()

    def describe(self) -> dict:
        """summary.json's `distributed`: the ranks, and the traffic of this process's training steps
        (`counted_steps` of them; evaluation and checkpoints not counted): `allreduce_bytes` (DDP's gradient
        buckets), `allgather_bytes` / `reduce_scatter_bytes` (FSDP2's gathered parameters, scattered gradients), each
        the whole buffer's bytes on this rank (a ring moves (N-1)/N of it per rank, twice for an all-reduce);
        with FSDP2 `fsdp_layout`, what one forward+backward should move (sharding.traffic_layout)."""
        out = {"world_size": self.world_size, "backend": self.backend, "fsdp": self.fsdp,
               "nodes": int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", "1")) or 1)
               if not self.single else 1, **self.traffic}
        if self.layout is not None:
            out["fsdp_layout"] = dict(self.layout)
        return out

    def count(self, kind: str, nbytes: int) -> None:
        """A collective's bytes (DDP's comm hook, FSDP2's comms), kept while a training step runs."""
        if self.counting:
            self.traffic[kind] += nbytes

    @contextlib.contextmanager
    def counting_step(self):
        """Count the collectives of one training step's forwards and backwards."""
        self.counting = True
        try:
            yield
        finally:
            self.counting = False
        self.traffic["counted_steps"] += 1

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float, fsdp: bool = False) -> tuple:
        """(Distributed, device): the process group torchrun's environment describes (RANK, WORLD_SIZE,
        LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or the one the caller initialised; one process otherwise. A CUDA
        run uses cuda:LOCAL_RANK unless a device index was given."""
        inited = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if inited else int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1 or not dist.is_available():
            return cls(device=device), device
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not inited:
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                        device_id=device if device.type == "cuda" else None)
            except Exception as e:  # noqa: BLE001 - any failure to start is the environment's
                raise DistributedError(
                    f"lorart.train: torch.distributed could not start (WORLD_SIZE={world}): {_first_line(e)}. "
                    "Launch every rank with torchrun (see docs/distributed.md)") from None
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=not inited, device=device,
                   fsdp=fsdp), device

    def close(self, failed: bool = False) -> None:
        """Leave the process group this run started (after a failure only gloo's: an NCCL group with a lost
        peer may block in its destructor, and the process is about to exit)."""
        if self.owns_group and dist.is_initialized() and (not failed or dist.get_backend() == "gloo"):
            dist.destroy_process_group()
        self.owns_group = False

    # -- collectives ------------------------------------------------------------------------------------------
    def sum(self, values: list) -> list:
        """Element-wise sums over the ranks (float64)."""
        if self.single:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.sum([1.0 if flag else 0.0])[0]) if not self.single else bool(flag)

    def gather(self, obj) -> list:
        """Every rank's `obj`, on every rank (picklable objects)."""
        if self.single:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.single:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- data -------------------------------------------------------------------------------------------------
    def bounds(self, n: int) -> tuple:
        """[lo, hi) of this rank's contiguous share of n items (the first n % world ranks get one more)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def rows(self, batch: dict) -> tuple:
        """(this rank's rows of a collated global batch, weight): weight 0 with a stand-in row when the batch has
        fewer rows than ranks (the rank still runs forward and backward: DDP and FSDP need every rank there)."""
        if self.single:
            return batch, 1.0
        lo, hi = self.bounds(batch["input_ids"].shape[0])
        if hi > lo:
            return {k: v[lo:hi] for k, v in batch.items()}, 1.0
        return {k: v[:1] for k, v in batch.items()}, 0.0

    def share(self, items: list) -> list:
        """This rank's items (every world_size-th, from its rank). With FSDP every rank must run the same number
        of forwards (they all-gather together): shorter shares are padded with None (run a stand-in, drop it)."""
        if self.single:
            return list(items)
        mine = list(items[self.rank::self.world_size])
        if self.fsdp:
            mine += [None] * (-(-len(items) // self.world_size) - len(mine))
        return mine

    # -- agreement --------------------------------------------------------------------------------------------
    def check_same(self, facts: dict) -> None:
        """Refuse ranks started differently: `facts` (options, model and data digests, ...) must be equal on every
        rank; the error names the rank and what differs, on every rank."""
        if self.single:
            return
        every = [_flatten(f) for f in self.gather(facts)]
        diffs = []
        for r, f in enumerate(every[1:], 1):
            for k in sorted(set(f) | set(every[0])):
                if f.get(k) != every[0].get(k):
                    diffs.append(f"rank {r}'s {k} is {f.get(k)!r}, rank 0's {every[0].get(k)!r}")
        if diffs:
            more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
            raise ValueError(f"lorart.train: the {self.world_size} ranks were not started with the same run: "
                             f"{'; '.join(diffs[:4])}{more}. Start every rank with the same options, model and data")

    def on_main(self, fn: Callable[[], object], what: str = ""):
        """fn() on rank 0 (its writes); its error raised on every rank. Returns fn's result on rank 0, None
        elsewhere."""
        if self.single:
            return fn()
        result, err = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, and announced to the other ranks
                err = e
        msg = self.broadcast(None if err is None else _first_line(err))
        if err is not None:
            raise err
        if msg is not None:
            raise RankError(msg, 0)
        return result

    def agree(self, fn: Callable[[], object]):
        """fn() on every rank; if it fails on any, every rank raises (its own error, else the first failed
        rank's)."""
        if self.single:
            return fn()
        result, err = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, and announced to the other ranks
            err = e
        msgs = self.gather(None if err is None else _first_line(err))
        if err is not None:
            raise err
        failed = next((r for r, m in enumerate(msgs) if m is not None), None)
        if failed is not None:
            raise RankError(f"{msgs[failed]} (on rank {failed})", failed)
        return result

    def agreed(self, e: Exception) -> Exception:
        """`e`, an error every rank raises alike: rank 0 reports it (the CLI prints it there only)."""
        if not self.is_main:
            e.reported_by = 0
        return e

    @contextlib.contextmanager
    def guard(self, where: Callable[[], str]):
        """A collective that fails for want of the other ranks becomes one DistributedError saying so."""
        try:
            yield
        except TrainingError:
            raise
        except Exception as e:
            if self.single or not is_comm_failure(e):
                raise
            raise DistributedError(
                f"lorart.train: rank {self.rank} of {self.world_size} lost contact with the other ranks {where()}: "
                f"{_first_line(e)}. Another rank stopped (its own error says why) or the network failed; this rank "
                "stops too") from e

    # -- the model --------------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through: DDP over the trainable parameters (gradients summed over
        the ranks as the buckets fill, overlapping backward), or the model itself sharded by FSDP2 in place."""
        if self.single:
            return model
        if self.fsdp:
            self.fsdp_groups = sharding.apply_fsdp(model, self.device, self.count)
            self.layout = sharding.traffic_layout(model)
            return model
        from torch.nn.parallel import DistributedDataParallel
        # no init sync: check_same proved the base and the trainable weights equal on every rank, and frozen
        # weights and buffers (NF4 storage) are never broadcast
        ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                      init_sync=False, forward_sync_buffers=False)
        ddp.register_comm_hook(self, _sum_hook)
        return ddp

    def no_sync(self, train_model: torch.nn.Module, last: bool):
        """DDP accumulates the micro-batches of a step locally and reduces once, with the last one's backward."""
        if last or self.fsdp or self.single:
            return contextlib.nullcontext()
        return train_model.no_sync()

    # -- whole tensors (checkpoints, best weights) --------------------------------------------------------------
    def full_state(self, params: dict) -> dict:
        """{name: the whole tensor on the CPU} on rank 0 ({} elsewhere); every rank takes part (FSDP gathers)."""
        out = {}
        for n, p in params.items():
            full = sharding.full_tensor(p.detach())
            if self.is_main:
                out[n] = full.to("cpu", copy=True)
        return out

    def load_full(self, params: dict, full: Optional[dict]) -> None:
        """Copy whole tensors held by rank 0 (`full`, None elsewhere) into the parameters (each rank its part)."""
        with torch.no_grad():
            for n, p in params.items():
                src = full[n] if self.is_main else None
                local_of(p).copy_(self.scatter(src, p, p.dtype))

    def scatter(self, full: Optional[torch.Tensor], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This rank's part of rank 0's whole tensor `full` (of `dtype`), laid out as `like` (a sharded
        parameter: its shard; else the whole tensor)."""
        if self.single:
            return full
        return sharding.scatter_like(full if self.is_main else None, like, dtype)

    def share_checkpoint(self, saved: Optional[dict], like: Callable[[tuple], Optional[torch.Tensor]]) -> dict:
        """Rank 0's loaded checkpoint on every rank: its structure and small values are broadcast; each tensor
        for which `like(path)` names a parameter arrives as this rank's part of it, one tensor at a time."""
        if self.single:
            return saved
        big: list = []

        def strip(obj, path):
            if isinstance(obj, torch.Tensor) and like(path) is not None:
                big.append(obj)
                return _Ref(obj.shape, obj.dtype)
            if isinstance(obj, dict):
                return {k: strip(v, path + (k,)) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(strip(v, path + (i,)) for i, v in enumerate(obj))
            return obj

        skeleton = self.broadcast(strip(saved, ()) if self.is_main else None)
        todo = iter(big)

        def fill(obj, path):
            if isinstance(obj, _Ref):
                return self.scatter(next(todo) if self.is_main else None, like(path), obj.dtype)
            if isinstance(obj, dict):
                return {k: fill(v, path + (k,)) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(fill(v, path + (i,)) for i, v in enumerate(obj))
            return obj

        return fill(skeleton, ())

    def full_optimizer_state(self, sd: dict) -> dict:
        """An optimizer state_dict with whole tensors (rank 0; FSDP's DTensor states gathered), {} elsewhere."""
        if self.single:
            return sd
        state = {}
        for i in sorted(sd["state"]):
            entry = {}
            for k, v in sd["state"][i].items():
                full = sharding.full_tensor(v) if isinstance(v, torch.Tensor) else v
                entry[k] = full.cpu() if isinstance(full, torch.Tensor) else full
            state[i] = entry
        return {"state": state, "param_groups": sd["param_groups"]} if self.is_main else {}

    def non_finite(self, params: dict) -> list:
        """Names of the parameters holding a non-finite value on any rank (the same list on every rank)."""
        bad = [n for n, p in params.items() if not bool(torch.isfinite(local_of(p)).all())]
        if self.single:
            return bad
        return sorted({n for b in self.gather(bad) for n in b}, key=list(params).index)
