"""Strict readers for the files lorart loads (JSON configs and safetensors weights).

One set of rules, shared with the C++ parser (`cpp/include/lorart/json.h`) so that a file is accepted or
refused the same way by every entry point:

- JSON: RFC 8259 only. No NaN / Infinity, no number out of double range (1e309), no duplicate keys, no lone
  UTF-16 surrogates, nesting at most 64 levels (a 100k-deep document is an error, not a crash), valid UTF-8.
  Integers beyond int64 are read as (non-integer) numbers, as the C++ parser does.
- Typed fields: an int is a JSON integer (not `true`, not `16.0`, not `"16"`), a bool is `true`/`false`, a
  number is finite. `get_*` raise `FileFormatError("lorart: FILE: key `k`: expected ..., got ...")`.
- safetensors: the file must parse; tensors must have an expected dtype (float32/bfloat16/float16 for weights)
  and, for weights, finite values.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import torch

from .errors import FileFormatError

MAX_DEPTH = 64
MAX_JSON_BYTES = 64 << 20
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT64 = (-(1 << 63), (1 << 63) - 1)


class _Bad(Exception):
    pass


def _const(name: str):
    raise _Bad(f"{name} is not a JSON number")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Bad(f"number {text} is out of range")
    return v


def _int(text: str):
    v = int(text)
    return v if _INT64[0] <= v <= _INT64[1] else _float(text)


def _pairs(items: list) -> dict:
    out = {}
    for k, v in items:
        if k in out:
            raise _Bad(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_tree(obj: Any) -> None:
    """Depth <= MAX_DEPTH (a scalar counts as one level, as in the C++ parser) and no lone surrogates."""
    stack = [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            raise _Bad(f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(v, str):
            if any("\ud800" <= c <= "\udfff" for c in v):
                raise _Bad("a string holds an unpaired UTF-16 surrogate")
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, d + 1))
                stack.append((x, d + 1))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def parse_json(data: bytes | str, where: str, error: type = FileFormatError) -> Any:
    """Parse a JSON document strictly (see the module docstring); `where` names it in errors."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"lorart: {where}: not valid JSON (invalid UTF-8 at byte {e.start})") from None
    try:
        obj = json.loads(data, parse_constant=_const, parse_float=_float, parse_int=_int, object_pairs_hook=_pairs)
        _check_tree(obj)
    except _Bad as e:
        raise error(f"lorart: {where}: not valid JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"lorart: {where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise error(f"lorart: {where}: not valid JSON (nesting deeper than {MAX_DEPTH} levels)") from None
    return obj


def read_json(path: str, error: type = FileFormatError, missing_ok: bool = False, obj: bool = True) -> Any:
    """Read a JSON file strictly; a JSON object unless `obj=False`. Missing: `{}` with `missing_ok`, else an error."""
    if not os.path.isfile(path):
        if missing_ok and not os.path.exists(path):
            return {}
        raise error(f"lorart: {path}: missing" if not os.path.exists(path) else f"lorart: {path}: not a file")
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise error(f"lorart: {path}: {size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB a JSON config may "
                        "have")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"lorart: {path}: cannot be read ({e.strerror})") from None
    v = parse_json(data, path, error)
    if obj and not isinstance(v, dict):
        raise error(f"lorart: {path}: expected a JSON object, got {json_type(v)}")
    return v


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _got(v: Any) -> str:
    if v is None:
        return "null"
    text = json.dumps(v) if isinstance(v, (str, int, float, bool)) or v is None else json_type(v)
    return f"{text[:80]} ({json_type(v)})" if not isinstance(v, (list, dict)) else text


class Fields:
    """Typed access to one JSON object of a file: `f.int("r", min=1)`, `f.bool("use_rslora", False)`, ..."""

    _MISSING = object()

    def __init__(self, obj: dict, path: str, prefix: str = "", error: type = FileFormatError, noun: str = "key"):
        self.obj, self.path, self.prefix, self.error, self.noun = obj, path, prefix, error, noun

    def fail(self, key: str, expected: str, got: Any = _MISSING) -> None:
        tail = "" if got is Fields._MISSING else f", got {_got(got)}"
        raise self.error(f"lorart: {self.path}: {self.noun} `{self.prefix}{key}`: expected {expected}{tail}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def _get(self, key: str, default: Any, expected: str) -> Any:
        v = self.obj.get(key)
        if v is None:
            if default is Fields._MISSING:
                if key in self.obj:
                    self.fail(key, expected, None)
                raise self.error(f"lorart: {self.path}: {self.noun} `{self.prefix}{key}` is missing (expected {expected})")
            return default
        return v

    def int(self, key: str, default: Any = _MISSING, min: int | None = None) -> Any:
        what = "an integer" + (f" >= {min}" if min is not None else "")
        v = self._get(key, default, what)
        if v is default and default is not Fields._MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or (min is not None and v < min):
            self.fail(key, what, v)
        return v

    def number(self, key: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None) -> Any:
        what = "a finite number" + (f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else "")
        v = self._get(key, default, what)
        if v is default and default is not Fields._MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(key, what, v)
        return v

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default, "true or false")
        if v is default and default is not Fields._MISSING:
            return v
        if not isinstance(v, bool):
            self.fail(key, "true or false", v)
        return v

    def str(self, key: str, default: Any = _MISSING, choices: Iterable[str] | None = None) -> Any:
        choices = tuple(choices) if choices is not None else None
        what = f"one of {', '.join(repr(c) for c in choices)}" if choices else "a string"
        v = self._get(key, default, what)
        if v is default and default is not Fields._MISSING:
            return v
        if not isinstance(v, str) or (choices and v not in choices):
            self.fail(key, what, v)
        return v

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default, "a list of strings")
        if v is default and default is not Fields._MISSING:
            return v
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(key, "a list of strings", v)
        return v

    def obj_of(self, key: str, kind: str, min: int | None = None) -> dict:
        """An object whose values are all integers (>= min) ("int") or all finite numbers ("number")."""
        v = self.obj.get(key)
        if v is None:
            return {}
        what = "an object of " + ("integers" + (f" >= {min}" if min is not None else "") if kind == "int"
                                  else "finite numbers")
        if not isinstance(v, dict):
            self.fail(key, what, v)
        sub = Fields(v, self.path, f"{self.prefix}{key}.", self.error)
        for k in v:
            sub.int(k, min=min) if kind == "int" else sub.number(k)
        return v

    def refuse_set(self, key: str, why: str) -> None:
        """`key` may be absent, null, false or empty; anything else is refused with `why`."""
        v = self.obj.get(key)
        if v is None or v is False or v == [] or v == {} or v == "":
            return
        raise self.error(f"lorart: {self.path}: {self.noun} `{self.prefix}{key}`: {why} (got {_got(v)})")


METHOD_FILE = "lorart_method.json"
METHOD_FORMAT_VERSION = 1


def read_method_file(directory: str, error: type = FileFormatError) -> dict | None:
    """`lorart_method.json` of a lorart method folder, checked (None when the folder has none):
    format_version is the integer 1, method a string, config and base_model objects (base_model of integers),
    base_model_name_or_path a string or null. Returns the object with "path" added."""
    path = os.path.join(directory, METHOD_FILE)
    if not os.path.exists(path):
        return None
    meta = read_json(path, error)
    f = Fields(meta, path, error=error)
    v = meta.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int):
        f.fail("format_version", f"the integer {METHOD_FORMAT_VERSION}", v if "format_version" in meta else
               Fields._MISSING)
    if v != METHOD_FORMAT_VERSION:
        raise error(f"lorart: {path}: key `format_version`: {v} is not a version this lorart reads (it reads "
                    f"{METHOD_FORMAT_VERSION}; a newer lorart wrote this folder?)")
    f.str("method")
    for key in ("config", "base_model"):
        if not isinstance(meta.get(key, {}), dict):
            f.fail(key, "an object", meta[key])
    base = meta.get("base_model") or {}
    bf = Fields(base, path, "base_model.", error)
    for k in base:
        bf.int(k, min=0)
    f.str("base_model_name_or_path", None)
    return {**meta, "config": meta.get("config") or {}, "base_model": base, "path": path}


def read_safetensors(path: str, error: type = FileFormatError, dtypes: tuple | None = FLOAT_DTYPES,
                     finite: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, checked: dtype in `dtypes` (None: any) and finite values."""
    if not os.path.isfile(path):
        raise error(f"lorart: {path}: missing")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated / corrupt header or data
        raise error(f"lorart: {path}: not a readable safetensors file ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]})") from None
    for k, t in out.items():
        check_tensor(t, path, k, error, dtypes, finite)
    return out


def check_tensor(t: torch.Tensor, path: str, key: str, error: type = FileFormatError,
                 dtypes: tuple | None = FLOAT_DTYPES, finite: bool = True) -> None:
    if dtypes is not None and t.dtype not in dtypes:
        names = "|".join(str(d).replace("torch.", "") for d in dtypes)
        raise error(f"lorart: {path}: key `{key}`: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise error(f"lorart: {path}: key `{key}`: {bad} of {t.numel()} values are not finite (NaN or infinity)")


__all__ = ["parse_json", "read_json", "Fields", "read_method_file", "METHOD_FILE", "METHOD_FORMAT_VERSION", "read_safetensors", "check_tensor", "json_type", "MAX_DEPTH",
           "FLOAT_DTYPES"]
