"""Training data: record formats (instruction, prompt/completion, chat, ShareGPT, text) in JSONL, JSON, Parquet
and CSV files, labels, splits, batching, the default set."""
from .batching import batch_indices, collate, iterate_batches, pack_examples
from .dataset import (DataFile, LoadedData, default_data_dir, default_dataset_paths, load_dataset, load_examples,
                      load_jsonl, split_examples)
from .files import read_jsonl, read_records
from .formats import FORMATS, IGNORE_INDEX, DataError, Example, alpaca_prompt, encode_record

__all__ = ["load_examples", "load_jsonl", "load_dataset", "split_examples", "default_dataset_paths",
           "default_data_dir", "collate", "pack_examples", "batch_indices", "iterate_batches", "encode_record",
           "read_jsonl", "read_records", "alpaca_prompt", "Example", "DataError", "DataFile", "LoadedData",
           "FORMATS", "IGNORE_INDEX"]
