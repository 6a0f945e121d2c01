"""Forward hooks that put virtual tokens (prompt tuning) or key/value prefixes (prefix tuning) into every call
of a lorart Llama model, including generate()'s cached decode steps."""
from __future__ import annotations

import inspect

import torch
from torch import nn


def bind_forward(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """All arguments of `model.forward(*args, **kwargs)` by name (defaults filled in)."""
    sig = getattr(model, "_lorart_forward_sig", None)
    if sig is None:
        sig = inspect.signature(type(model).forward)
        model._lorart_forward_sig = sig
    b = sig.bind(model, *args, **kwargs)
    b.apply_defaults()
    out = dict(b.arguments)
    out.pop("self")
    return out


def seq_info(kw: dict, model: nn.Module) -> tuple[int, int, torch.device]:
    x = kw["input_ids"] if kw["input_ids"] is not None else kw["inputs_embeds"]
    if x is None:
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def past_len(kw: dict) -> int:
    c = kw.get("past_key_values")
    return 0 if c is None else int(c.seq_len)


def default_positions(kw: dict, B: int, T: int, past: int, device) -> torch.Tensor:
    """The positions LlamaForCausalLM.forward would use (count of real tokens before each position)."""
    m = kw["attention_mask"]
    if m is not None and m.dim() == 2 and not bool(m.all()):
        return (m.to(device).long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    return torch.arange(past, past + T, device=device)[None].expand(B, T)


def extend_mask_front(mask: torch.Tensor | None, P: int, T: int) -> torch.Tensor | None:
    """Prepend P always-visible key positions to a 2D [B, S] or 4D bool [B, 1, T, S] mask."""
    if mask is None:
        return None
    B = mask.shape[0]
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(B, P), mask], dim=1)
    return torch.cat([mask.new_ones(B, 1, T, P), mask], dim=-1)


def extend_mask_square(mask: torch.Tensor, P: int) -> torch.Tensor:
    """A 4D bool [B, 1, T, T] mask (packed documents) for P virtual tokens placed before the sequence: the
    virtual tokens see each other causally, every real token sees all of them."""
    B, _, T, S = mask.shape
    top = torch.cat([torch.ones(P, P, dtype=torch.bool, device=mask.device).tril().expand(B, 1, P, P),
                     mask.new_zeros(B, 1, P, S)], dim=-1)
    bottom = torch.cat([mask.new_ones(B, 1, T, P), mask], dim=-1)
    return torch.cat([top, bottom], dim=2)
