"""Data files -> records: JSON Lines, JSON arrays, Parquet, CSV/TSV; folders and globs of them.

Every record comes with the number a person finds it by: the line for JSON and CSV (the line a record
starts on), the row (1-based) for Parquet. Text must be UTF-8 (a BOM is allowed); anything else is a
`DataError` naming `file:line`.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from typing import Iterator

from .formats import DataError

JSONL_EXTS = (".jsonl", ".ndjson")
JSON_EXTS = (".json",)
PARQUET_EXTS = (".parquet", ".pq")
CSV_EXTS = (".csv", ".tsv")
DATA_EXTS = JSONL_EXTS + JSON_EXTS + PARQUET_EXTS + CSV_EXTS
# CSV / Parquet columns that hold a list of turns (JSON text in a CSV cell)
LIST_COLUMNS = ("messages", "conversations")


def expand_sources(src: str) -> list:
    """The data files named by `src`: a file, a folder (its data files, sorted, not recursive) or a glob
    pattern (`*`, `?`, `[...]`, `**`)."""
    if os.path.isdir(src):
        files = sorted(os.path.join(src, f) for f in os.listdir(src)
                       if not f.startswith(".") and f.lower().endswith(DATA_EXTS)
                       and os.path.isfile(os.path.join(src, f)))
        if not files:
            raise DataError(f"{src}: the folder holds no data files (expected {', '.join(DATA_EXTS)})")
        return files
    if os.path.exists(src):
        return [src]
    if glob.has_magic(src):
        files = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"{src}: no data file matches the pattern")
        return files
    raise FileNotFoundError(f"{src}: no such data file")


def container_of(path: str) -> str:
    """`jsonl`, `json`, `parquet`, `csv` or `tsv` (by the file extension; JSON-like otherwise)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in JSONL_EXTS:
        return "jsonl"
    if ext in PARQUET_EXTS:
        return "parquet"
    if ext in CSV_EXTS:
        return ext[1:]
    return "json"  # .json and anything else: a JSON array or JSON Lines, told apart by the content


def read_records(path: str) -> tuple:
    """`(container, [(number, record_dict), ...])` for one data file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such data file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; expected a data file")
    kind = container_of(path)
    if kind == "parquet":
        records = list(_read_parquet(path))
    elif kind in ("csv", "tsv"):
        records = list(_read_csv(path, "\t" if kind == "tsv" else ","))
    else:
        if kind == "json" and _first_char(path) == "[":
            records = _read_json_array(path)
        else:
            kind = "jsonl"
            records = list(_read_jsonl(path))
    if not records:
        raise DataError(f"{path}: the file has no records")
    return kind, records


def read_jsonl(path: str) -> list:
    """Return `[(line_number, record_dict), ...]` of a JSON Lines file; blank lines are skipped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such data file")
    records = list(_read_jsonl(path))
    if not records:
        raise DataError(f"{path}: the file has no records")
    return records


# ---- text --------------------------------------------------------------------------------------
def _decode(raw: bytes, path: str, line: int, col0: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{col0 + e.start + 1}); save the file as UTF-8") from None


def _check_bom(head: bytes, path: str) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}:1: the file is UTF-16 text; lorart reads UTF-8 (convert it, e.g. "
                        "`iconv -f UTF-16 -t UTF-8`)")


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
        _check_bom(head, path)
        while head:
            s = head.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if s:
                return chr(s[0])
            head = f.read(4096)
    return ""


def _read_jsonl(path: str) -> Iterator:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                _check_bom(raw, path)
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            line = _decode(raw, path, n)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(rec, dict):
                hint = " (a JSON array of records belongs in a .json file)" if isinstance(rec, list) else ""
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}{hint}")
            yield n, rec


def _read_json_array(path: str) -> list:
    with open(path, "rb") as f:
        raw = f.read()
    _check_bom(raw, path)
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col + 1}); "
                        "save the file as UTF-8") from None
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    i, line, last = text.index("[") + 1, 1, 0
    out = []
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == "]" and not out:
            break
        line += text.count("\n", last, i)
        last = i
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: JSON nested too deeply") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{line}: array element {len(out)} must be a JSON object (a record), "
                            f"got {type(rec).__name__}")
        out.append((line, rec))
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            break
        line += text.count("\n", last, i)
        last = i
        raise DataError(f"{path}:{line}: invalid JSON (expected ',' or ']' after array element {len(out) - 1})")
    if text[i + 1:].strip():
        line += text.count("\n", last, i)
        raise DataError(f"{path}:{line}: invalid JSON (extra data after the array)")
    return out


# ---- tables ------------------------------------------------------------------------------------
def _parse_list_cells(row: dict, path: str, line: int) -> dict:
    for k in LIST_COLUMNS:
        v = row.get(k)
        if isinstance(v, str):
            try:
                row[k] = json.loads(v)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: column {k!r} must hold a JSON list of turns ({e.msg})") from None
    return row


def _utf8_lines(path: str) -> Iterator:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                _check_bom(raw, path)
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            yield _decode(raw, path, n)


def _read_csv(path: str, delimiter: str) -> Iterator:
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long fields are cut before tokenizing, not refused by the reader
    try:
        reader = csv.reader(_utf8_lines(path), delimiter=delimiter)
        line = 1
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            if len(set(header)) != len(header) or not all(header):
                raise DataError(f"{path}:1: the header needs distinct, non-empty column names, got {header}")
            line = reader.line_num + 1
            for cells in reader:
                start, line = line, reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{path}:{start}: {len(cells)} fields, the header has {len(header)}")
                row = {k: v for k, v in zip(header, cells) if v != ""}  # CSV has no null: empty = absent
                yield start, _parse_list_cells(row, path, start)
        except csv.Error as e:
            raise DataError(f"{path}:{line}: invalid CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _read_parquet(path: str) -> Iterator:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f'{path}: reading Parquet needs pyarrow: pip install "lorart[data]"') from None
    try:
        pf = pq.ParquetFile(path)
        n = 0
        for batch in pf.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                n += 1
                row = {k: v for k, v in row.items() if v is not None}  # a column absent from this row
                yield n, _parse_list_cells(row, path, n)
    except DataError:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid / OSError on a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
