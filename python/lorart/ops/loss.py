"""Chunked linear + cross-entropy: the language-model loss without the [tokens, vocab] logits.

    loss = sum_i  logsumexp(h_i @ W.T + b) - (h_i @ W.T + b)[y_i]      over rows with y_i != ignore_index
    (divided by the number of such rows for reduction="mean")

The plain path (``lm_head(h)`` then ``F.cross_entropy``) holds the logits, their fp32 copy, the log-softmax
and the gradient of the logits at once: 4 x tokens x vocab x 4 bytes (8 x 512 tokens of SmolLM2's 49,152-token
vocabulary: 3.2 GB; Llama-3's 128K vocabulary at 8 x 2048 tokens: 34 GB). Here the rows go through in chunks
of ``chunk_rows``: per chunk the logits are formed in the input dtype and widened to fp32 (as the plain path
does), reduced to the loss (via log_softmax, as F.cross_entropy), and, when a gradient will be needed, turned
at once into the chunk's gradients

    dlogits = softmax(logits) - onehot(y)        (zero on ignored rows)
    dh      = dlogits.to(h.dtype) @ W             dW += dlogits.to(h.dtype).T @ h     db += dlogits.sum(0)

so only one chunk of logits is alive at a time and nothing of size tokens x vocab is saved for backward
(backward scales the stored dh, dW, db by the incoming gradient). The forward therefore does the backward's
matmuls; they are skipped when no input requires a gradient. Arithmetic matches ``F.cross_entropy`` on the
full fp32 logits to float rounding (tests compare losses and gradients); dW is summed over chunks in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_BYTES = 64 << 20  # fp32 logits per chunk


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about 64 MiB (at least 16 rows)."""
    return max(16, _CHUNK_BYTES // (4 * max(int(vocab), 1)))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument (CUDA only)
        return torch.is_autocast_enabled()


def _check(h: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, reduction: str, chunk_rows) -> None:
    if not isinstance(h, Tensor) or h.dim() != 2 or not h.dtype.is_floating_point:
        raise ValueError(f"lorart: linear_cross_entropy: argument `h`: expected a float [rows, hidden] tensor, got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"lorart: linear_cross_entropy: argument `weight`: expected [vocab, {h.shape[1]}], got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != h.dtype and not _autocast_on(h.device.type):
        raise TypeError(f"lorart: linear_cross_entropy: argument `weight`: expected dtype {h.dtype} (as `h`), got "
                        f"{weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"lorart: linear_cross_entropy: argument `bias`: expected [{weight.shape[0]}], got "
                         f"{tuple(bias.shape)}")
    if labels.dim() != 1 or labels.shape[0] != h.shape[0] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"lorart: linear_cross_entropy: argument `labels`: expected an int64 [{h.shape[0]}] tensor, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"lorart: linear_cross_entropy: argument `reduction`: expected 'sum' or 'mean', got "
                         f"{reduction!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"lorart: linear_cross_entropy: argument `chunk_rows`: expected a positive int, got "
                         f"{chunk_rows!r}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != h.device:
            raise ValueError(f"lorart: linear_cross_entropy: argument `{name}`: expected device {h.device} (as `h`), "
                             f"got {t.device}")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index, chunk_rows, want_grad):
        need_h, need_w, need_b = want_grad
        V = weight.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=h.device) if need_b else None
        # Without autocast the logits and their log-softmax go into two buffers reused by every chunk: fresh
        # 64 MiB tensors per chunk cost a page fault per 4 KiB on the CPU, and log_softmax takes one fused pass
        # where logsumexp, sub and exp took several.
        reuse = h.dtype == acc and weight.dtype == acc and (bias is None or bias.dtype == acc) and not _autocast_on(
            h.device.type)
        if reuse:
            rows = min(chunk_rows, h.shape[0])
            buf_logits = torch.empty(rows, V, dtype=acc, device=h.device)
            buf_lsm = torch.empty(rows, V, dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            hc, yc = h[s:s + chunk_rows], labels[s:s + chunk_rows]
            if reuse:
                n = hc.shape[0]
                logits = (torch.mm(hc, weight.t(), out=buf_logits[:n]) if bias is None
                          else torch.addmm(bias, hc, weight.t(), out=buf_logits[:n]))
                gdtype = acc
                lsm = torch.ops.aten._log_softmax.out(logits, 1, False, out=buf_lsm[:n])
            else:
                logits = F.linear(hc, weight, bias)
                gdtype = logits.dtype  # the dtype the plain path's logits (and their gradient) would have
                lsm = torch.log_softmax(logits.to(acc), dim=1)
            valid = yc != ignore_index
            yv = torch.where(valid, yc, torch.zeros_like(yc)).unsqueeze(1)
            nll = lsm.gather(1, yv).squeeze(1).neg_().masked_fill_(~valid, 0.0)
            total += nll.sum()
            if not (need_h or need_w or need_b):
                continue
            d = lsm.exp_()                                      # softmax, in place of the log-softmax
            d.scatter_add_(1, yv, -valid.unsqueeze(1).to(d.dtype))
            if d.is_cuda or not bool(valid.all()):              # (a host check would synchronise a GPU)
                d.mul_(valid.unsqueeze(1))
            if need_b:
                grad_b += d.sum(0)
            dg = d.to(gdtype)
            if need_h:
                if grad_h.dtype == gdtype:
                    torch.mm(dg, weight.to(gdtype), out=grad_h[s:s + chunk_rows])
                else:  # autocast: h wider than the logits; the plain path casts its gradient back the same way
                    grad_h[s:s + chunk_rows].copy_(dg @ weight.to(gdtype))
            if need_w:
                grad_w += (dg.t() @ hc.to(gdtype)).to(acc)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        grad_h, grad_w, grad_b = ctx.grads  # freed with the graph; kept intact for retain_graph=True
        dh = None if grad_h is None else grad_h * g.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * g).to(ctx.w_dtype)
        db = None if grad_b is None else (grad_b * g).to(ctx.w_dtype)
        return dh, dw, db, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "sum", chunk_rows: int | None = None) -> Tensor:
    """Cross-entropy of ``F.linear(h, weight, bias)`` against ``labels`` without forming all the logits.

    h [rows, hidden], weight [vocab, hidden], labels [rows] (``ignore_index`` rows contribute nothing).
    Returns the loss in fp32 (fp64 for fp64 inputs): the sum over counted rows, or their mean (0 when none
    counts). Gradients flow to h, weight and bias as through the plain path. ``chunk_rows`` (default: 64 MiB of fp32 logits) bounds memory.
    """
    _check(h, weight, labels, bias, reduction, chunk_rows)
    if not h.is_cuda and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if (lo < 0 and lo != ignore_index) or hi >= weight.shape[0]:
            bad = lo if lo < 0 and lo != ignore_index else hi
            raise ValueError(f"lorart: linear_cross_entropy: argument `labels`: expected ids in [0, {weight.shape[0]}) "
                             f"or {ignore_index}, got {bad}")
    labels = labels.long()
    grad_on = torch.is_grad_enabled()
    want = (grad_on and h.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    total = _LinearCrossEntropy.apply(h, weight, bias, labels, int(ignore_index), rows, want)
    if reduction == "mean":
        total = total / (labels != ignore_index).sum().clamp(min=1)
    return total


__all__ = ["linear_cross_entropy", "default_chunk_rows"]
