"""Training data: JSONL formats (instruction / chat / text), labels, splits, batching, default set."""
from .batching import batch_indices, collate, iterate_batches, pack_examples
from .dataset import default_data_dir, default_dataset_paths, load_dataset, load_jsonl, split_examples
from .formats import IGNORE_INDEX, DataError, Example, alpaca_prompt, encode_record, read_jsonl

__all__ = ["load_jsonl", "load_dataset", "split_examples", "default_dataset_paths", "default_data_dir",
           "collate", "pack_examples", "batch_indices", "iterate_batches", "encode_record",
           "read_jsonl", "alpaca_prompt", "Example", "DataError", "IGNORE_INDEX"]
