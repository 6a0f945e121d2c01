"""Load JSONL datasets into tokenized examples, truncate, split."""
from __future__ import annotations

import os
import random
import warnings
from typing import Optional

from .formats import DataError, encode_record, read_jsonl


def load_jsonl(path: str, tokenizer, max_seq_len: Optional[int] = None) -> list:
    """Tokenize every record of a JSONL file. Examples longer than `max_seq_len` are truncated
    (one warning with the count); those left with no target tokens are dropped."""
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    examples, truncated, dropped = [], 0, 0
    records = read_jsonl(path)
    for n, rec in records:
        ex = encode_record(rec, tokenizer, where=f"{path}:{n}")
        if max_seq_len is not None and len(ex) > max_seq_len:
            truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:max_seq_len], ex.labels[:max_seq_len]
            if ex.num_target_tokens == 0:
                dropped += 1
                continue
        examples.append(ex)
    if truncated:
        msg = (f"{path}: {truncated} of {len(records)} examples were longer than max_seq_len="
               f"{max_seq_len} tokens and were truncated")
        if dropped:
            msg += f"; {dropped} had no target tokens left and were dropped"
        warnings.warn(msg, stacklevel=2)
    if not examples:
        raise DataError(f"{path}: no usable examples (all were dropped after truncation)")
    return examples


def split_examples(examples: list, eval_fraction: float, seed: int = 0):
    """Deterministic `(train, eval)` split; both keep the original order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(examples), []
    n_eval = max(1, round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training examples "
                         f"out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def load_dataset(path: str, tokenizer, max_seq_len: Optional[int] = None,
                 eval_path: Optional[str] = None, eval_fraction: float = 0.0, seed: int = 0):
    """`(train, eval)` examples: eval from `eval_path` if given, else a held-out fraction."""
    train = load_jsonl(path, tokenizer, max_seq_len)
    if eval_path is not None:
        if eval_fraction:
            raise ValueError("pass either eval_path or eval_fraction, not both")
        return train, load_jsonl(eval_path, tokenizer, max_seq_len)
    return split_examples(train, eval_fraction, seed)


def default_data_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")


def default_dataset_paths() -> dict:
    """Paths of the bundled default data: `train`, `heldout` (answer-format chats) and
    `general` (plain prose, for a forgetting / perplexity check)."""
    d = default_data_dir()
    paths = {k: os.path.join(d, f"{k}.jsonl") for k in ("train", "heldout", "general")}
    for k, p in paths.items():
        if not os.path.exists(p):
            raise FileNotFoundError(f"bundled data file {p} is missing (reinstall lorart, or run "
                                    f"python {os.path.join(d, 'make_default.py')})")
    return paths
