"""Pure-PyTorch NF4 reference for the LoRA tests, written from /work/shared/notes/nf4-format.md (bitsandbytes'
layout): an NF4 weight as one object (lorart.ops.nf4.NF4Args: packed, absmax, nested_absmax, nested_code, offset,
blocksize, rows, cols)."""
from __future__ import annotations

import torch

from lorart.ops.nf4 import NF4Args

NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


def nf4_quantize_ref(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    rows, cols = W.shape
    flat = W.float().reshape(-1)
    n = flat.numel()
    nb = (n + blocksize - 1) // blocksize
    padded = torch.zeros(nb * blocksize)
    padded[:n] = flat
    absmax = padded.view(nb, blocksize).abs().amax(1)
    scaled = padded.view(nb, blocksize) * torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))[:, None]
    codes = (scaled.reshape(-1)[:n, None] - NF4_TABLE[None]).abs().argmin(1).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, torch.tensor([7], dtype=torch.uint8)])
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    if not double_quant:
        return NF4Args(packed, absmax, None, None, 0.0, blocksize, rows, cols)
    code = torch.linspace(-1, 1, 256)  # any sorted 256-entry map exercises the decode formula
    offset = absmax.mean().item()
    centred = absmax - offset
    ng = (nb + 255) // 256
    pad = torch.zeros(ng * 256)
    pad[:nb] = centred
    nabs = pad.view(ng, 256).abs().amax(1).clamp_min(1e-12)
    q = ((centred / nabs.repeat_interleave(256)[:nb])[:, None] - code[None]).abs().argmin(1).to(torch.uint8)
    return NF4Args(packed, q, nabs, code, offset, blocksize, rows, cols)


def nf4_dequantize_ref(w: NF4Args) -> torch.Tensor:
    rows, cols, absmax, blocksize = w.rows, w.cols, w.absmax, w.blocksize
    n = rows * cols
    b = w.packed.reshape(-1)
    codes = torch.stack([b >> 4, b & 0xF], 1).reshape(-1)[:n].long()
    if absmax.dtype == torch.uint8:
        nb = absmax.numel()
        am = w.nested_code[absmax.long()] * w.nested_absmax.repeat_interleave(256)[:nb] + w.offset
    else:
        am = absmax
    return (NF4_TABLE[codes] * am.repeat_interleave(blocksize)[:n]).view(rows, cols)
