"""Run configuration files: `lorart train --config run.yaml|run.json` and the `config.yaml` every run writes.

A config file is one mapping whose keys are the run's inputs (RUN_KEYS: model, data, eval_data, general_data,
output_dir, device) and any TrainOptions field (method_options a mapping of the method's own options). Values are
checked as strictly as lorart's other files (fileformats.Fields): an int is an integer (not `16.0`, not `"16"`), a
bool is true/false, null only where the option takes None; then the option's own range checks
(TrainOptions.validate). An unknown key, a duplicate key or a bad value is a FileFormatError naming the file and
the key. YAML is read with the YAML 1.2 core schema (`lr: 2e-4` is a number, `yes` and `010` stay a string and
decimal ten; no anchors or aliases); JSON with lorart's strict JSON reader.

    file = read_config("run.yaml")                                 # {key: value} as written, checked
    values = merge_config(file, command_line_values, "run.yaml")   # the command line wins
    text = dump_config(resolved_config(opts, ...))    # what `config.yaml` holds: every key, repeatable
"""
from __future__ import annotations

import difflib
import json
import os
import re
import typing
from typing import Any, Optional

from ..errors import FileFormatError
from ..fileformats import MAX_JSON_BYTES, Fields, read_json
from ..methods import method_class
from ..methods.base import MethodError, make_config
from ..sysinfo import require
from .folder import CONFIG_HEADER
from .options import OptionError, TrainOptions, option_names, parse_targets

CONFIG_FILE = "config.yaml"
# the run's inputs, besides the TrainOptions fields: key -> what it takes
RUN_KEYS = {"model": "a model folder or .gguf path, or 'default'", "data": "a data file, folder or glob, or 'default'",
            "eval_data": "a data file, folder or glob", "general_data": "true, false or a data file",
            "output_dir": "a folder", "device": "'auto', 'cpu' or 'cuda[:N]'"}
# keys that belong on the command line only: they say what to do with the output folder, not what the run is
COMMAND_LINE_ONLY = {"resume": "--resume", "overwrite": "--overwrite", "quiet": "--quiet", "config": "--config"}
SUFFIXES = (".yaml", ".yml", ".json")
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
YAML11_BOOLS = {"yes", "no", "y", "n", "on", "off"}   # booleans in YAML 1.1, strings in the 1.2 core schema


def keys() -> list:
    return list(RUN_KEYS) + option_names()


# -- reading ----------------------------------------------------------------------------------------------------
def _yaml_resolvers(cls) -> None:
    """The YAML 1.2 core schema's implicit types on a pyyaml Loader or Dumper class (pyyaml speaks YAML 1.1,
    where `2e-4` is a string and `yes`, `on`, `010` are a bool and an octal int)."""
    cls.yaml_implicit_resolvers = {}
    for tag, rx, first in (
            ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
            ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
            ("int", r"^[-+]?[0-9]+$", list("-+0123456789")),
            ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                      r"|\.(?:nan|NaN|NAN))$", list("-+.0123456789"))):
        cls.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(rx), first)


def _yaml_classes():
    yaml = require("yaml", "a YAML config file")

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "anchors and aliases are not supported",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (dict, list)):
                    raise yaml.constructor.ConstructorError(None, None, "a key must be a string", key_node.start_mark)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    class Dumper(yaml.SafeDumper):
        pass

    for cls in (Loader, Dumper):
        _yaml_resolvers(cls)
    Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10))
    return yaml, Loader, Dumper


def _read_yaml(path: str) -> Any:
    yaml, Loader, _ = _yaml_classes()
    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise FileFormatError(f"lorart: {path}: more than the {MAX_JSON_BYTES >> 20} MiB a config file may have")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FileFormatError(f"lorart: {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"lorart: {path}: not valid YAML (invalid UTF-8 at byte {e.start})") from None
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise FileFormatError(f"lorart: {path}: not valid YAML ({e.problem or e.context}{at})") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise FileFormatError(f"lorart: {path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None


def _unknown(key: str, path: str) -> FileFormatError:
    if key in COMMAND_LINE_ONLY:
        return FileFormatError(f"lorart: {path}: key `{key}`: not a config key; pass {COMMAND_LINE_ONLY[key]} on "
                               "the command line")
    near = difflib.get_close_matches(key.replace("-", "_"), keys(), n=1)
    hint = f" (did you mean `{near[0]}`?)" if near else ""
    return FileFormatError(f"lorart: {path}: unknown key `{key}`{hint}; a config takes {', '.join(RUN_KEYS)} and "
                           f"the options of `lorart train --help` (docs/train.md)")


def _check_value(f: Fields, key: str, hint) -> Any:
    """The value of `key` checked against its TrainOptions type (or RUN_KEYS) as strictly as a config.json."""
    v = f.obj[key]
    if key in RUN_KEYS:
        if key == "general_data" and isinstance(v, bool):
            return v
        if key == "general_data" and isinstance(v, str) and v.lower() in YAML11_BOOLS:
            f.fail(key, "true, false or a data file (YAML 1.2: `no`, `yes`, `on`, `off` are strings; write false "
                        "or true)", v)
        if key == "device" and not (isinstance(v, str) and DEVICE.fullmatch(v)):
            f.fail(key, RUN_KEYS[key], v)
        if key in ("output_dir", "device"):
            if v == "":
                f.fail(key, RUN_KEYS[key], v)
            return f.str(key)
        return f.str(key, None)
    if key in ("targets", "report_to"):   # a string (as on the command line) or a list of strings
        if isinstance(v, str):
            return f.str(key)
        return f.str_list(key)
    if key == "method_options":
        if v is not None and not isinstance(v, dict):
            f.fail(key, "a mapping of the method's options", v)
        return v
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    kw = {"default": None} if optional else {}   # null only where the option takes None
    if base is bool:
        return f.bool(key, **kw)
    if base is int:
        return f.int(key, **kw)
    if base is float:
        return f.number(key, **kw)
    if base is str:
        return f.str(key, **kw)
    raise AssertionError(f"TrainOptions.{key}: no config rule for {hint}")  # a new field needs one here


def read_config(path) -> dict:
    """The keys of a config file (.yaml/.yml/.json), type-checked and range-checked; FileFormatError naming the
    file and the key otherwise. An empty YAML file is an empty config."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileFormatError(f"lorart: {path}: no such config file")
    if not os.path.isfile(path):
        raise FileFormatError(f"lorart: {path}: not a file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise FileFormatError(f"lorart: {path}: expected a .yaml, .yml or .json config file")
    obj = read_json(path) if suffix == ".json" else _read_yaml(path)
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise FileFormatError(f"lorart: {path}: expected a mapping of keys to values, got {type(obj).__name__}")
    for k in obj:
        if not isinstance(k, str):
            raise FileFormatError(f"lorart: {path}: key {k!r}: keys must be strings")
    hints = typing.get_type_hints(TrainOptions)
    f = Fields(obj, path)
    out = {}
    for k in obj:
        if (k not in RUN_KEYS and k not in hints) or k == "extra":
            raise _unknown(k, path)
        out[k] = _check_value(f, k, hints.get(k))
    if isinstance(out.get("targets"), str):
        out["targets"] = parse_targets(out["targets"])   # as on the command line: names, a regex or all-linear
    opts = {k: v for k, v in out.items() if k in hints and v is not None}
    try:
        TrainOptions(**opts).validate()
    except OptionError as e:
        raise FileFormatError(f"lorart: {path}: key `{e.name}`: {e.detail}") from None
    return out


def merge_config(file: Optional[dict], given: dict, path: Optional[str] = None) -> dict:
    """The keys of the config file `path` (`file`, from read_config), then the command line's (`given`: the keys
    given there); `method_options` merge key by key. The file's method options are checked against the run's
    method here (naming the file)."""
    file = file or {}
    out = {**file, **{k: v for k, v in given.items() if k != "method_options"}}
    mo_file, mo_given = file.get("method_options") or {}, given.get("method_options") or {}
    if mo_file or mo_given:
        out["method_options"] = {**mo_file, **mo_given}
    if mo_file and path is not None:
        own = {k: v for k, v in mo_file.items() if k not in mo_given}
        try:
            make_config(method_class(out.get("method", "lora")), own, where=path, prefix="method_options.")
        except MethodError as e:
            if str(e).startswith(f"lorart: {path}"):
                raise FileFormatError(str(e)) from None
    return out


# -- writing ----------------------------------------------------------------------------------------------------
def _source(v) -> Any:
    """A model / data argument as config.yaml records it: paths absolute, in-memory objects marked."""
    if v is None or isinstance(v, bool) or v == "default":
        return v
    if isinstance(v, (str, os.PathLike)):
        return os.path.abspath(os.fspath(v))
    return f"<in-memory {type(v).__name__}: pass it again; not repeatable from this file>"


def resolved_config(opts: TrainOptions, *, model, data, eval_data, general_data, output_dir, device) -> dict:
    """Every key of a run (RUN_KEYS, then every TrainOptions field) with the value this run used."""
    run = {"model": _source(model), "data": _source(data), "eval_data": _source(eval_data),
           "general_data": _source(general_data if general_data is not None else False),
           "output_dir": os.path.abspath(os.fspath(output_dir)), "device": str(device)}
    d = opts.to_dict()
    d.pop("extra", None)
    return json.loads(json.dumps({**run, **d}))   # tuples -> lists; plain types only


def config_header(device_arg, device, dtype_arg, dtype) -> str:
    """The comment atop config.yaml: what `auto` resolved to, and how to repeat the run."""
    return (f"{CONFIG_HEADER[2:]}, resolved (device {device_arg} -> {device}, dtype {dtype_arg or 'auto'} -> "
            f"{str(dtype).replace('torch.', '')}).\nRepeat the run: lorart train --config {CONFIG_FILE} --output-dir "
            "OTHER_DIR (flags override keys; docs/train.md)")


def dump_config(cfg: dict, header: str = "") -> str:
    """YAML text that `read_config` reads back to `cfg` (strings that would read as another type are quoted)."""
    yaml, _, Dumper = _yaml_classes()
    body = yaml.dump(cfg, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 16)
    lines = "".join(f"# {ln}\n".replace("# \n", "#\n") for ln in header.splitlines())
    return lines + body


__all__ = ["CONFIG_FILE", "RUN_KEYS", "read_config", "merge_config", "resolved_config", "config_header",
           "dump_config", "keys"]
