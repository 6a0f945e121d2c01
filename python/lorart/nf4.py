"""NF4 weights in bitsandbytes' exact layout (4-bit NormalFloat, blockwise, optional double quant).

    w4 = lorart.nf4.quantize(w, blocksize=64, double_quant=True)   # any shape, fp32/bf16/fp16, cpu/cuda
    w4.dequantize()                                                 # original shape and dtype
    sd = w4.to_bnb_state_dict("model.layers.0.mlp.up_proj.")       # the keys HF writes for bnb Linear4bit
    w4 = lorart.nf4.NF4Weight.from_bnb_state_dict(sd, "model.layers.0.mlp.up_proj.")

See docs/nf4.md for the format, the rounding rule and the NaN policy.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Optional

import torch
from torch import Tensor

from .ops.nf4 import CheckedNF4, NF4Args, check_weight, nf4_dequantize, nf4_double_quant, nf4_quantize

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256
QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAMES_TO_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}


def nf4_code(device="cpu") -> Tensor:
    """The 16 NF4 values (index -> value), float32."""
    return _code_cached(str(torch.device(device))).clone()


@functools.lru_cache(maxsize=None)
def _code_cached(device: str) -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device="cpu") -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)), computed from its definition: 256 sorted float32 values in [-0.99297, 1]."""
    return _dynamic_cached(str(torch.device(device))).clone()


@functools.lru_cache(maxsize=None)
def _dynamic_cached(device: str) -> Tensor:
    max_exp, total = 7, 8
    non_sign = total - 1
    data: list[float] = []
    for i in range(max_exp):  # exponent 10^(i - 6); 2^i fraction values per sign
        items = 2 ** (i + non_sign - max_exp) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    # 2^(non_sign - max_exp) - 1 == 0 extra items for the 8-bit signed map
    data += [0.0, 1.0]
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    if len(shape) >= 2:
        return math.prod(shape[:-1]), int(shape[-1])
    return 1, math.prod(shape)


# ---- reading Hugging Face / bitsandbytes 4-bit state dicts --------------------------------------------------

def _get(sd: dict, key: str):
    if key not in sd:
        near = sorted(k for k in sd if k.startswith(key.rsplit(".", 1)[0]))[:8]
        raise KeyError(f"lorart: bnb 4-bit state dict: missing key `{key}` (keys with that prefix: {near})")
    return sd[key]


def _tensor(sd: dict, key: str, dtype: torch.dtype) -> torch.Tensor:
    t = _get(sd, key)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lorart: bnb 4-bit state dict: `{key}` must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"lorart: bnb 4-bit state dict: `{key}` must be {dtype}, got {t.dtype}")
    return t


def _parse_quant_state(blob: torch.Tensor, key: str) -> dict:
    try:
        d = json.loads(bytes(blob.detach().cpu().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"lorart: bnb 4-bit state dict: `{key}` is not UTF-8 JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"lorart: bnb 4-bit state dict: `{key}` must hold a JSON object, got {type(d).__name__}")
    for f in ("quant_type", "blocksize", "dtype", "shape"):
        if f not in d:
            raise ValueError(f"lorart: bnb 4-bit state dict: `{key}` lacks the field `{f}` (got {sorted(d)})")
    if d["quant_type"] != "nf4":
        raise ValueError(f"lorart: bnb 4-bit state dict: quant_type must be 'nf4', got {d['quant_type']!r}")
    if d["dtype"] not in _NAMES_TO_DTYPE:
        raise ValueError(f"lorart: bnb 4-bit state dict: dtype must be one of {sorted(_NAMES_TO_DTYPE)}, "
                         f"got {d['dtype']!r}")
    if not isinstance(d["shape"], list) or not all(isinstance(s, int) and s > 0 for s in d["shape"]):
        raise ValueError(f"lorart: bnb 4-bit state dict: shape must be a list of positive ints, got {d['shape']!r}")
    return d


def _parse_bnb_state_dict(sd: dict, prefix: str, device) -> tuple:
    """NF4Weight's constructor arguments from the HF bnb-4bit keys at `prefix`."""
    p = prefix + "weight"
    qs_key = p + "." + QUANT_STATE_SUFFIX
    if qs_key not in sd and (p + ".quant_state.bitsandbytes__fp4") in sd:
        raise ValueError(f"lorart: bnb 4-bit state dict at `{prefix}`: FP4 weights are not supported (NF4 only)")
    d = _parse_quant_state(_tensor(sd, qs_key, torch.uint8), qs_key)
    packed = _tensor(sd, p, torch.uint8)
    quant_map = _tensor(sd, p + ".quant_map", torch.float32)
    if quant_map.numel() != 16 or not torch.equal(quant_map.detach().cpu().reshape(-1),
                                                  torch.tensor(NF4_CODE, dtype=torch.float32)):
        raise ValueError(f"lorart: bnb 4-bit state dict: `{p}.quant_map` is not the NF4 code table")
    dq = "nested_offset" in d or (p + ".nested_absmax") in sd
    if dq:
        for f in ("nested_blocksize", "nested_offset", "nested_dtype"):
            if f not in d:
                raise ValueError(f"lorart: bnb 4-bit state dict: `{qs_key}` lacks `{f}` for double quantization")
        if d["nested_blocksize"] != 256 or d["nested_dtype"] != "float32":
            raise ValueError("lorart: bnb 4-bit state dict: expected nested_blocksize 256 and nested_dtype "
                             f"float32, got {d['nested_blocksize']!r} and {d['nested_dtype']!r}")
        absmax = _tensor(sd, p + ".absmax", torch.uint8)
        nested_absmax = _tensor(sd, p + ".nested_absmax", torch.float32)
        nested_code = _tensor(sd, p + ".nested_quant_map", torch.float32)
        offset = float(d["nested_offset"])
    else:
        absmax = _tensor(sd, p + ".absmax", torch.float32)
        nested_absmax = nested_code = None
        offset = 0.0
    dev = torch.device(device) if device is not None else packed.device
    f = lambda t: None if t is None else t.detach().to(dev).contiguous()  # noqa: E731
    return (f(packed), f(absmax).reshape(-1), f(nested_absmax), f(nested_code), offset, int(d["blocksize"]),
            torch.Size(d["shape"]), _NAMES_TO_DTYPE[d["dtype"]])


_FROZEN = frozenset(("packed", "absmax", "nested_absmax", "nested_code", "offset", "blocksize", "shape", "rows",
                     "cols"))


class NF4Weight(CheckedNF4):
    """A frozen NF4-quantized tensor. Fields follow the NF4 contract (docs/nf4.md):
    packed uint8 [(n+1)//2, 1]; absmax float32 [nblocks] or, with double quant, uint8 codes;
    nested_absmax float32 [ceil(nblocks/256)] | None; nested_code float32 [256] | None;
    offset (float); blocksize; shape (original); dtype (original / compute dtype).

    Checked once, when built (the ops then skip the weight's own consistency on every call), and frozen: its
    fields cannot be reassigned (build a new NF4Weight); its tensors are contiguous (made so when built), as the
    kernels read them."""

    __slots__ = ("packed", "absmax", "nested_absmax", "nested_code", "offset", "blocksize", "shape", "dtype", "rows",
                 "cols", "_built")

    def __init__(self, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                 offset: float, blocksize: int, shape, dtype: torch.dtype):
        c = lambda t: t.contiguous() if isinstance(t, Tensor) else t  # noqa: E731  (check_weight names a non-tensor)
        self.packed = c(packed)
        self.absmax = c(absmax)
        self.nested_absmax = c(nested_absmax)
        self.nested_code = c(nested_code)
        self.offset = float(offset)
        self.blocksize = int(blocksize)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"lorart: NF4Weight: `dtype` must be float32|bfloat16|float16, got {dtype}")
        self.rows, self.cols = _rows_cols(self.shape)  # the [rows, cols] matrix the ops see
        check_weight(self)
        self._built = True

    def __setattr__(self, name, value):
        if name in _FROZEN and getattr(self, "_built", False):
            raise AttributeError(f"lorart: NF4Weight is frozen: `{name}` cannot be reassigned (build a new NF4Weight)")
        object.__setattr__(self, name, value)

    # ---- geometry -------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed nibbles + block scales (+ nested scales; the shared code tables excluded)."""
        n = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.nested_absmax is not None:
            n += self.nested_absmax.numel() * 4
        return n

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight: 4 + 8/blocksize + 32/(blocksize*256) with double quant (4.127 at 64)."""
        nb = -(-self.numel // self.blocksize)
        bits = 4.0 * self.numel + (8.0 if self.double_quant else 32.0) * nb
        if self.double_quant:
            bits += 32.0 * (-(-nb // NESTED_BLOCKSIZE))
        return bits / self.numel

    def op_args(self) -> NF4Args:
        """The weight as the ops' schema has it (packed, absmax, nested_absmax, nested_code, offset, blocksize,
        rows, cols): for calling torch.ops.lorart.* directly. lorart's own calls pass the NF4Weight itself."""
        return NF4Args(self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset, self.blocksize,
                       self.rows, self.cols)

    # ---- conversions ------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The weight in its original shape, in `dtype` (default: the original dtype)."""
        return nf4_dequantize(self, dtype or self.dtype).reshape(self.shape)

    def to(self, device) -> "NF4Weight":
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(f(self.packed), f(self.absmax), f(self.nested_absmax), f(self.nested_code), self.offset,
                         self.blocksize, self.shape, self.dtype)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")

    # ---- Hugging Face / bitsandbytes serialization ---------------------------------------
    def quant_state_json(self) -> dict:
        d = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
             "shape": list(self.shape)}
        if self.double_quant:
            d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": self.offset})
        return d

    def to_bnb_state_dict(self, prefix: str = "") -> dict:
        """The tensors Hugging Face writes for a bitsandbytes Linear4bit (nf4) at module path `prefix`."""
        p = prefix + "weight"
        sd = {p: self.packed, p + ".absmax": self.absmax, p + ".quant_map": _code_cached(str(self.device)).clone()}
        if self.double_quant:
            sd[p + ".nested_absmax"] = self.nested_absmax
            sd[p + ".nested_quant_map"] = self.nested_code.clone()
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        sd[p + "." + QUANT_STATE_SUFFIX] = torch.tensor(list(blob), dtype=torch.uint8, device=self.device)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "", device=None) -> "NF4Weight":
        """Reads the HF bnb-4bit keys at `prefix` (see to_bnb_state_dict). Raises KeyError for missing keys
        and ValueError for a state that is not a consistent NF4 weight."""
        return cls(*_parse_bnb_state_dict(sd, prefix, device))


def quantize(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """NF4-quantizes `w` (float32|bfloat16|float16, any shape, cpu or cuda) exactly as
    bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"lorart: argument `w`: expected a torch.Tensor, got {type(w).__name__}")
    with torch.no_grad():
        w = w.detach()
        packed, absmax = nf4_quantize(w, blocksize)
        nested_absmax = nested_code = None
        offset = 0.0
        if double_quant:
            offset_t = absmax.mean().reshape(1)
            nested_code = _dynamic_cached(str(w.device)).clone()
            absmax, nested_absmax = nf4_double_quant(absmax, offset_t, nested_code)
            offset = float(offset_t)
    return NF4Weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, w.shape, w.dtype)


__all__ = ["NF4Weight", "quantize", "nf4_code", "dynamic_map", "NF4_CODE", "QUANT_STATE_SUFFIX"]
