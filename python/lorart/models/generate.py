"""Greedy / nucleus-sampling generation with a KV cache; batches use left padding."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .llama import KVCache


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int):
    """Left-pad token lists into `(input_ids, attention_mask)` LongTensors."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad needs a non-empty list of non-empty token sequences")
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, n - len(s):] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next token ids from float logits [B, vocab]: argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: Union[int, Sequence[int], None] = None,
             attention_mask: Optional[torch.Tensor] = None, pad_token_id: Optional[int] = None,
             use_cache: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Return `[batch, prompt + new]` token ids. temperature 0 = greedy. A row stops at any id
    in `eos_token_id` (that EOS is kept); finished rows are filled with `pad_token_id`
    (default: the first EOS id, else 0). Batched prompts must be left-padded."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq > 0, got {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"lorart: generate: argument `max_new_tokens`: expected an int >= 0, got {max_new_tokens!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:   # NaN fails both comparisons
        raise ValueError(f"lorart: generate: argument `top_p`: expected a number in (0, 1], got {top_p!r}")
    if not isinstance(temperature, (int, float)) or not 0.0 <= temperature < float("inf"):
        raise ValueError(f"lorart: generate: argument `temperature`: expected a finite number >= 0, got "
                         f"{temperature!r}")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int)
                                           else list(eos_token_id))
    pad_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    device = model.device
    ids = input_ids.to(device)
    B = ids.shape[0]
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = attention_mask.to(device).long()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("generate needs left padding: attention_mask has zeros after ones")
        if bool((mask.sum(-1) == 0).any()):
            raise ValueError("a prompt in the batch is empty (all padding)")
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config.num_hidden_layers) if use_cache else None
        step_ids = ids
        for _ in range(max_new_tokens):
            out = model(step_ids, attention_mask=mask, past_key_values=cache, use_cache=use_cache,
                        logits_to_keep=1)
            nxt = sample_next(out.logits[:, -1].float(), temperature, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            if eos:
                finished |= torch.isin(nxt, eos_t)
                if bool(finished.all()):
                    break
            step_ids = nxt[:, None] if use_cache else ids
    finally:
        model.train(was_training)
    return ids


def chat(model, tokenizer, prompts, max_new_tokens: int = 128, temperature: float = 0.0,
         top_p: float = 1.0, system: Optional[str] = None, generator=None) -> list:
    """Answer each prompt (a str, or a list of chat messages) with the tokenizer's chat template;
    returns the decoded answers without special tokens."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    seqs = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        seqs.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    ids, mask = left_pad(seqs, tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_token_id=tokenizer.eos_ids or None, attention_mask=mask,
                   pad_token_id=tokenizer.pad_id, generator=generator)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
