"""Load data (files, folders, globs, in-memory records) into tokenized examples; truncate; split."""
from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from .files import expand_sources, read_records
from .formats import DataError, encode_normalized, normalize


@dataclass
class DataFile:
    """What was read from one source: its container (jsonl, json, parquet, csv, tsv, or records for
    in-memory data), the record formats found (format -> count), and what truncation did."""
    path: str
    container: str
    formats: dict = field(default_factory=dict)
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    @property
    def format(self) -> str:
        """The record format, or "mixed: a, b" when the file holds several."""
        return next(iter(self.formats)) if len(self.formats) == 1 else "mixed: " + ", ".join(sorted(self.formats))

    def describe(self) -> dict:
        return {"path": self.path, "container": self.container, "format": self.format, "records": self.records,
                "examples": self.examples, "truncated": self.truncated, "dropped": self.dropped}


@dataclass
class LoadedData:
    """Tokenized examples and the files they came from."""
    examples: list
    files: list

    def describe(self) -> list:
        """One dict per source (path, container, format, counts): what a run's summary records."""
        return [f.describe() for f in self.files]


def _encode_all(records, tokenizer, max_seq_len: Optional[int], info: DataFile, where) -> list:
    formats, out = Counter(), []
    for n, rec in records:
        loc = where(n)
        norm = normalize(rec, loc)
        formats[norm[0]] += 1
        ex = encode_normalized(norm, tokenizer, loc, max_seq_len)
        info.records += 1
        if max_seq_len is not None and len(ex) > max_seq_len:
            info.truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:max_seq_len], ex.labels[:max_seq_len]
            if ex.num_target_tokens == 0:
                info.dropped += 1
                continue
        out.append(ex)
    info.formats = dict(formats.most_common())
    info.examples = len(out)
    if info.truncated:
        msg = (f"{info.path}: {info.truncated} of {info.records} examples were longer than max_seq_len="
               f"{max_seq_len} tokens and were truncated")
        if info.dropped:
            msg += f"; {info.dropped} had no target tokens left and were dropped"
        warnings.warn(msg, stacklevel=3)
    return out


def load_examples(src, tokenizer, max_seq_len: Optional[int] = None, what: str = "data") -> LoadedData:
    """Tokenize `src`: a data file (.jsonl, .json array or lines, .parquet, .csv, .tsv), a folder of them, a
    glob pattern, or in memory a list / iterable of record dicts (e.g. a `datasets.Dataset`). Examples longer
    than `max_seq_len` are truncated (one warning per file with the count); those left with no target tokens
    are dropped. The record format is detected per record and reported per file (`LoadedData.files`)."""
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    if isinstance(src, (str, os.PathLike)):
        examples, files = [], []
        for path in expand_sources(os.fspath(src)):
            container, records = read_records(path)
            info = DataFile(path, container)
            examples += _encode_all(records, tokenizer, max_seq_len, info, lambda n, p=path: f"{p}:{n}")
            files.append(info)
        if not examples:
            raise DataError(f"{os.fspath(src)}: no usable examples (all were dropped after truncation)")
        return LoadedData(examples, files)
    if isinstance(src, (bytes, Mapping)) or not hasattr(src, "__iter__"):
        hint = " (a datasets.DatasetDict: pass one split, e.g. ds['train'])" if isinstance(src, Mapping) else ""
        raise TypeError(f"argument `{what}`: expected a data file, folder or glob, or a list of records, got "
                        f"{type(src).__name__}{hint}")
    records = []
    for i, rec in enumerate(src):
        if not isinstance(rec, Mapping):
            hint = " (a pandas DataFrame: pass df.to_dict('records'))" if hasattr(src, "columns") else ""
            raise DataError(f"argument `{what}`: record {i} must be a dict, got {type(rec).__name__}{hint}")
        records.append((i, dict(rec)))
    if not records:
        raise DataError(f"argument `{what}`: the list of records is empty")
    info = DataFile(f"<{what} records>", "records")
    examples = _encode_all(records, tokenizer, max_seq_len, info, lambda i: f"{what}[{i}]")
    if not examples:
        raise DataError(f"argument `{what}`: no usable examples after truncation to max_seq_len")
    return LoadedData(examples, [info])


def load_jsonl(path: str, tokenizer, max_seq_len: Optional[int] = None) -> list:
    """The examples of a data file (any format `load_examples` reads; the name is historical)."""
    return load_examples(path, tokenizer, max_seq_len).examples


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
