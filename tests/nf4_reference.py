"""Pure-PyTorch NF4 reference written from /work/shared/notes/nf4-format.md (the spec),
independent of lorart's kernels. Used by tests/test_nf4*.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0], dtype=torch.float32)


def _nearest(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value, ties to the lower index (number of midpoints < x)."""
    mids = (table[:-1] + table[1:]) / 2
    return torch.searchsorted(mids, x.contiguous(), side="left")


def _reference_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.detach().reshape(-1).float().cpu()
    n = x.numel()
    nb = -(-n // blocksize)
    xp = F.pad(x, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = xp.abs().amax(1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    q = _nearest(CODE, xp * inv[:, None]).reshape(-1)[:n]
    if n % 2:
        q = torch.cat([q, torch.tensor([7])])
    packed = ((q[0::2] << 4) | q[1::2]).to(torch.uint8).reshape(-1, 1)
    return packed, absmax


def _reference_double_quant(absmax: torch.Tensor, code256: torch.Tensor, offset=None):
    """offset: the mean of absmax as the caller computed it (a reduction's rounding depends on the device)."""
    offset = absmax.mean() if offset is None else torch.as_tensor(offset, dtype=torch.float32).reshape(())
    v = absmax - offset
    nb = v.numel()
    nn_ = -(-nb // 256)
    vp = F.pad(v, (0, nn_ * 256 - nb)).reshape(nn_, 256)
    nested = vp.abs().amax(1)
    inv = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))
    q = _nearest(code256, vp * inv[:, None]).reshape(-1)[:nb].to(torch.uint8)
    return q, nested, offset


def _reference_absmax(absmax, nested_absmax=None, nested_code=None, offset=0.0):
    if absmax.dtype != torch.uint8:
        return absmax.float().cpu()
    q = absmax.cpu().long()
    b = torch.arange(q.numel()) // 256
    return nested_code.cpu()[q] * nested_absmax.cpu()[b] + torch.tensor(offset, dtype=torch.float32)


def reference_dequantize_weight(w, dtype=torch.float32):
    """_reference_dequantize of an NF4 weight object (NF4Weight: its fields; the original shape)."""
    return _reference_dequantize(w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize,
                                 tuple(w.shape), dtype)


def _reference_dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, shape, dtype):
    n = 1
    for s in shape:
        n *= s
    p = packed.cpu().reshape(-1).long()
    q = torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n]
    scale = _reference_absmax(absmax, nested_absmax, nested_code, offset)
    w = CODE[q] * scale.repeat_interleave(blocksize)[:n]
    return w.to(dtype).reshape(shape)


def _reference_dynamic_map() -> torch.Tensor:
    """bnb's create_dynamic_map(signed=True) from its definition (8 bits, 7 exponent bits)."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)
