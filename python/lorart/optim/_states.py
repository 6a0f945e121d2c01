"""Per-parameter optimizer state formats of PagedAdamW and their conversions.

- state_bits=32: torch.optim.AdamW's entries: step (float32 scalar tensor), exp_avg, exp_avg_sq.
- state_bits=8: bitsandbytes' AdamW8bit entries: step (int), state1/state2 (uint8, the parameter's
  shape), absmax1/absmax2 (float32 [ceil(numel / 256)]), qmap1/qmap2 (the dynamic maps); tensors
  with fewer than min_8bit_size elements keep float32 state1/state2 (as bitsandbytes). state_dict()
  nests the non-step entries under bitsandbytes' FSDP key, exactly as AdamW8bit.state_dict() does.

Loading accepts any of these (nested or not) into either width: float32 <- 8-bit dequantises with
the checkpoint's own qmaps, 8-bit <- float32 quantises with the kernels' rule, 8-bit <- 8-bit copies
the bytes when the qmaps are ours (else dequantises and requantises).
"""
from __future__ import annotations

import torch

from ..dtensor import local_of
from ..ops.optim import BLOCK, dynamic_map, quantize_blockwise8
from ._paging import LAYOUT8, StateLayout

BNB_WRAP_KEY = "__bnb_optimizer_quant_state__"  # bitsandbytes.optim.optimizer.Optimizer8bit's key
BNB_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


def wrap_bnb(entry: dict) -> dict:
    """A state entry as bitsandbytes' state_dict() writes it (quantisation tensors nested)."""
    out = {k: v for k, v in entry.items() if k not in BNB_KEYS}
    nested = {k: entry[k] for k in BNB_KEYS if k in entry}
    if nested:
        out[BNB_WRAP_KEY] = nested
    return out


def unwrap_bnb(entry: dict) -> dict:
    if isinstance(entry, dict) and BNB_WRAP_KEY in entry:
        entry = {**{k: v for k, v in entry.items() if k != BNB_WRAP_KEY}, **entry[BNB_WRAP_KEY]}
    return entry


def step_value(src: dict) -> float:
    step = src.get("step", 0)
    return float(step.item()) if isinstance(step, torch.Tensor) else float(step)


def _expand(absmax: torch.Tensor, n: int) -> torch.Tensor:
    return absmax.detach().float().cpu().repeat_interleave(BLOCK)[:n]


def _float_states(src: dict, n: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """exp_avg, exp_avg_sq of a source entry as flat float32 CPU tensors."""
    if "exp_avg" in src:
        m, v = src["exp_avg"], src["exp_avg_sq"]
    elif "state1" in src and src["state1"].dtype == torch.uint8:
        maps = []
        for k, signed in ((1, True), (2, False)):
            qmap = src.get(f"qmap{k}")
            maps.append(dynamic_map(signed) if qmap is None else qmap.detach().float().cpu())
            if maps[-1].numel() != 256:
                raise ValueError(f"lorart: {where}: qmap{k} must have 256 entries, got {maps[-1].numel()}")
        m = maps[0][src["state1"].detach().reshape(-1).cpu().long()] * _expand(src["absmax1"], n)
        v = maps[1][src["state2"].detach().reshape(-1).cpu().long()] * _expand(src["absmax2"], n)
    elif "state1" in src:
        m, v = src["state1"], src["state2"]
    else:
        raise ValueError(f"lorart: {where}: expected torch.optim.AdamW state (exp_avg, exp_avg_sq) or bitsandbytes "
                         f"state (state1, state2, ...), got keys {sorted(src)}")
    out = []
    for name, t in (("exp_avg", m), ("exp_avg_sq", v)):
        if t.numel() != n:
            raise ValueError(f"lorart: {where}: {name} has {t.numel()} elements, the parameter {n}")
        out.append(t.detach().to(device="cpu", dtype=torch.float32).reshape(-1))
    return out[0], out[1]


def _check8(src: dict, n: int, where: str) -> None:
    nb = -(-n // BLOCK)
    for k in ("state1", "state2"):
        if src[k].numel() != n:
            raise ValueError(f"lorart: {where}: {k} has {src[k].numel()} elements, the parameter {n}")
    for k in ("absmax1", "absmax2"):
        if k not in src or src[k].numel() != nb or not src[k].is_floating_point():
            got = "none" if k not in src else f"{src[k].numel()} {src[k].dtype}"
            raise ValueError(f"lorart: {where}: {k} must be {nb} float elements (ceil({n} / {BLOCK})), got {got}")


def as_dtensors(state: dict, param_groups: list) -> None:
    """In a state_dict's "state" (indices as torch.optim.Optimizer.state_dict numbers the parameters): the float32
    states of sharded (DTensor) parameters become DTensors over their local shards, with the parameter's mesh,
    placements, shape and stride, as torch.optim.AdamW's states are under FSDP2. Plain parameters are untouched."""
    index, params = {}, []
    for g in param_groups:
        for p in g["params"]:
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
    for i, entry in list(state.items()):
        p = params[i]
        if local_of(p) is p:
            continue
        from torch.distributed.tensor import DTensor   # imported already: p is one
        state[i] = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    if k in ("exp_avg", "exp_avg_sq") else v for k, v in entry.items()}   # a new dict: not self.state's


def fill(storage: tuple, layout: StateLayout, src: dict, p: torch.Tensor, where: str) -> None:
    """Copies a source state entry (any format above) into this optimizer's storage of p (a local shard: the
    states of a sharded parameter may be DTensors, whose local shards are copied)."""
    n = p.numel()
    src = {k: local_of(v) if isinstance(v, torch.Tensor) else v for k, v in unwrap_bnb(src).items()}
    is8 = "state1" in src and src["state1"].dtype == torch.uint8
    if is8:
        _check8(src, n, where)
    if layout is LAYOUT8:
        ours = all(src.get(f"qmap{k}") is None or torch.equal(src[f"qmap{k}"].detach().float().cpu(), dynamic_map(s))
                   for k, s in ((1, True), (2, False)))
        if is8 and ours:
            for dst, key in zip(storage, ("state1", "state2", "absmax1", "absmax2")):
                dst.copy_(src[key].detach().reshape(dst.shape))
            return
        m, v = _float_states(src, n, where)
        for (q, a), dst in zip((quantize_blockwise8(m, True), quantize_blockwise8(v, False)),
                               ((storage[0], storage[2]), (storage[1], storage[3]))):
            dst[0].copy_(q.reshape(dst[0].shape))
            dst[1].copy_(a)
        return
    m, v = _float_states(src, n, where)
    storage[0].copy_(m.reshape(storage[0].shape))
    storage[1].copy_(v.reshape(storage[1].shape))


def entries(storage: tuple, layout: StateLayout, state_bits: int, step: float, qmaps) -> dict:
    """self.state[p] of a parameter: torch's entries (state_bits=32) or bitsandbytes' (state_bits=8)."""
    if state_bits == 32:
        return {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": storage[0], "exp_avg_sq": storage[1]}
    e = {"step": int(step), "state1": storage[0], "state2": storage[1]}
    if layout is LAYOUT8:
        e.update(absmax1=storage[2], absmax2=storage[3], qmap1=qmaps[0], qmap2=qmaps[1])
    return e

