"""Held-out loss / perplexity, greedy sample generations and the answer-format accuracy.

With several ranks (`dist`, training/distributed.py) each computes its share of the batches / prompts and the sums
and answers are combined: every rank gets the same result."""
from __future__ import annotations

import contextlib
import math
import re
from typing import Optional

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, collate
from ..models.generate import generate, left_pad


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    """torch.autocast for a run in a 16-bit dtype (CUDA bf16/fp16, CPU bf16), else nothing."""
    if (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            or device.type == "cpu" and dtype == torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens a batch is trained to predict: position t's label is predicted from tokens < t, so position 0
    never counts, even when its label is a target (text records)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def forward_logits(model, batch: dict, device: torch.device) -> torch.Tensor:
    kw = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"].to(device)
    out = model(**kw)
    return out.logits if hasattr(out, "logits") else out[0]


def batch_nll_sum(model, batch: dict, device: torch.device, forward=None) -> tuple:
    """(sum of next-token NLL in fp32, number of target tokens) of one batch. lorart's own models compute it
    from the hidden states in chunks (lorart.ops.loss): the [tokens, vocab] logits are never formed. `forward`:
    the module to call instead of `model` (its DDP wrapper)."""
    call = forward if forward is not None else model
    if getattr(model, "supports_chunked_loss", False):
        kw = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
              "labels": batch["labels"].to(device), "loss_reduction": "sum", "return_logits": False}
        if "position_ids" in batch:
            kw["position_ids"] = batch["position_ids"].to(device)
        out = call(**kw)
        return out.loss, target_tokens(batch["labels"])
    return token_nll_sum(forward_logits(call, batch, device), batch["labels"])


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(sum of next-token NLL in fp32, number of target tokens)."""
    shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    tgt = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(shift, tgt, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, target_tokens(labels)


@torch.no_grad()
def eval_loss(model, examples: list, pad_id: int, device, dtype, batch_size: int = 8, dist=None) -> Optional[dict]:
    """Token-weighted mean loss and perplexity over `examples` (in their order), dropout off; with `dist`, each
    rank evaluates its share of the batches and the sums are reduced."""
    if not examples:
        return None
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # less padding
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        for b in (batches if dist is None else dist.share(batches)):
            batch = collate([examples[i] for i in (b or batches[0])], pad_id)   # None: a stand-in (FSDP)
            with autocast_ctx(device, dtype):
                nll, n = batch_nll_sum(model, batch, device)
            if b is not None:
                total += float(nll)
                count += n
    finally:
        model.train(was)
    if dist is not None:
        total, count = dist.sum([total, count])
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": int(count)}


def prompt_and_reference(ex) -> tuple:
    """The ids before the first target token (the prompt) and the first target span (the reference)."""
    labels = ex.labels
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), None)
    if first is None or first == 0:  # plain text: the first half is the prompt
        first = max(1, len(ex.input_ids) // 2)
    end = first
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return ex.input_ids[:first], ex.input_ids[first:end]


@torch.no_grad()
def generate_samples(model, tokenizer, examples: list, n: int, max_new_tokens: int, device, dtype,
                     is_lorart: bool, batch_size: int = 8, dist=None) -> list:
    """Greedy answers to the first `n` held-out prompts: [{"prompt", "reference", "output"}]. With `dist`, each
    rank answers its share; under FSDP the ranks decode in lockstep (every rank runs max_new_tokens steps on as
    many prompts, the answers are cut at the first EOS), as they all-gather the weights together."""
    items = [prompt_and_reference(e) for e in examples[:n]]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    eos = tokenizer.eos_ids or None
    lockstep = dist is not None and dist.fsdp
    mine = list(range(len(items))) if dist is None else dist.share(list(range(len(items))))
    outs = {}
    was = model.training
    model.eval()
    try:
        for s in range(0, len(mine), batch_size):
            chunk = mine[s:s + batch_size]
            ids, mask = left_pad([items[0 if i is None else i][0] for i in chunk], pad)
            with autocast_ctx(device, dtype):
                if is_lorart:
                    gen = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=None if lockstep else eos,
                                   attention_mask=mask, pad_token_id=pad)
                else:
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                         eos_token_id=eos, synced_gpus=lockstep)
            for i, row in zip(chunk, gen):
                new = row[ids.shape[1]:].tolist()
                if lockstep and eos:
                    new = new[:next((k + 1 for k, t in enumerate(new) if t in eos), len(new))]
                if i is not None:
                    outs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was)
    if dist is not None:
        outs = {i: o for part in dist.gather(outs) for i, o in part.items()}
    outs = [outs[i] for i in range(len(items))]
    return [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference":
             tokenizer.decode(r, skip_special_tokens=True).strip(), "output": o} for (p, r), o in zip(items, outs)]


def format_accuracy(samples: list, regex: Optional[str]) -> Optional[float]:
    """Fraction of generated outputs that are exactly one answer in the expected format."""
    if regex is None or not samples:
        return None
    rx = re.compile(regex)
    return sum(1 for s in samples if rx.fullmatch(s["output"].strip())) / len(samples)


def short_prompt(prompt: str) -> str:
    """The last user turn of a rendered chat prompt (for tables), else the prompt's tail."""
    m = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, flags=re.S)
    text = m[-1] if m else prompt.replace("<|im_start|>", "").replace("<|im_end|>", "")
    text = " ".join(text.split())
    return text if len(text) <= 120 else "..." + text[-117:]
