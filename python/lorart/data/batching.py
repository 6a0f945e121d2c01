"""Batching: right-padded collate, length-grouped batch order, packing."""
from __future__ import annotations

import random
from typing import Iterator, Optional

import torch

from .formats import IGNORE_INDEX, Example


def collate(examples: list, pad_id: int, pad_to_multiple_of: Optional[int] = None) -> dict:
    """Right-pad into `input_ids`, `attention_mask`, `labels` (-100 on padding) LongTensors.

    Packed examples (with `doc_lens`) get a block-diagonal causal bool mask `[B, 1, L, L]` and
    `position_ids` that restart at each document, so documents never see each other."""
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_id is None:
        raise ValueError("collate needs a pad_id (the tokenizer has no pad or EOS token)")
    L = max(len(e) for e in examples)
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    if not any(e.doc_lens for e in examples):
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    block = torch.zeros((B, 1, L, L), dtype=torch.bool)
    pos = torch.zeros((B, L), dtype=torch.long)
    for i, e in enumerate(examples):
        start = 0
        for d in (e.doc_lens or [len(e)]):
            block[i, 0, start:start + d, start:start + d] = torch.ones(d, d, dtype=torch.bool).tril()
            pos[i, start:start + d] = torch.arange(d)
            start += d
    return {"input_ids": ids, "attention_mask": block, "labels": labels, "position_ids": pos}


def pack_examples(examples: list, max_seq_len: int) -> list:
    """Greedily concatenate examples (in order) into sequences of at most `max_seq_len` tokens.
    The first label of every document is masked: it would be predicted across a boundary."""
    packs, cur = [], None
    for e in examples:
        if len(e) > max_seq_len:
            raise ValueError(f"{e.source}: example of {len(e)} tokens exceeds max_seq_len="
                             f"{max_seq_len}; load with max_seq_len to truncate first")
        if cur is None or len(cur) + len(e) > max_seq_len:
            cur = Example([], [], "packed", [])
            packs.append(cur)
        cur.input_ids += e.input_ids
        cur.labels += [IGNORE_INDEX] + e.labels[1:]
        cur.doc_lens.append(len(e))
    return packs


def batch_indices(lengths: list, batch_size: int, *, shuffle: bool = True, group_by_length: bool = True,
                  seed: int = 0, epoch: int = 0, mega_batch_mult: int = 16,
                  drop_last: bool = False) -> list:
    """Lists of example indices, deterministic in (seed, epoch). With `group_by_length`, indices
    are shuffled, cut into mega-batches of `batch_size * mega_batch_mult`, sorted by length within
    each, then batched; batch order is shuffled with the longest batch first (fail-fast on memory)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * mega_batch_mult
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and shuffle and batches:
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def iterate_batches(examples: list, batch_size: int, pad_id: int, *, seed: int = 0, epoch: int = 0,
                    shuffle: bool = True, group_by_length: bool = True, drop_last: bool = False,
                    pad_to_multiple_of: Optional[int] = None) -> Iterator[dict]:
    """Yield collated batches for one epoch."""
    for idx in batch_indices([len(e) for e in examples], batch_size, shuffle=shuffle,
                             group_by_length=group_by_length, seed=seed, epoch=epoch,
                             drop_last=drop_last):
        yield collate([examples[i] for i in idx], pad_id, pad_to_multiple_of)
