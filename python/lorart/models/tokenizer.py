"""Tokenizer wrapper: a `tokenizers.Tokenizer` plus special ids and a jinja2 chat template."""
from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime
from typing import TYPE_CHECKING, Optional, Sequence, Union

from ..errors import FileFormatError, InputError
from ..fileformats import read_json
from ..sysinfo import require

if TYPE_CHECKING:
    import tokenizers


def _token_str(t) -> Optional[str]:
    if isinstance(t, dict):
        return t.get("content")
    return t


class Tokenizer:
    """Encode/decode text and render chat templates.

    `bos_id`, `eos_id` and `pad_id` are ints or None; `pad_id` falls back to `eos_id`.
    `eos_ids` lists every id that ends generation (e.g. Llama 3 has several).
    """

    def __init__(self, tk: "tokenizers.Tokenizer", *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None,
                 chat_template: Optional[str] = None, add_bos_token: bool = False,
                 extra_eos_ids: Sequence[int] = ()):
        self.tk = tk
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.bos_id = self._id(self.bos_token)
        self.eos_id = self._id(self.eos_token)
        self.pad_id = self._id(self.pad_token)
        self.eos_ids = sorted({i for i in [self.eos_id, *extra_eos_ids] if i is not None})
        self._template = None
        self._max_token_chars = None

    def _id(self, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def max_token_chars(self) -> int:
        """Length of the longest vocabulary entry (byte-level entries count bytes): no token covers more
        characters of the input text, so `n` tokens never need more than `n * max_token_chars` of it."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self.tk.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: Optional[bool] = None) -> list:
        """Token ids of `text`. Special-token strings in the text (e.g. `<|im_start|>`) map to
        their ids. A BOS id is prepended when `add_bos` (default: the tokenizer's add_bos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tk.token_to_id(token)

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs) -> Union[str, list]:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        _check_messages(messages)
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        text = render_bounded(self._template, dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                                   **kwargs))
        return self.encode(text, add_bos=False) if tokenize else text

    # ------------------------------------------------------------------ files
    @classmethod
    def from_folder(cls, folder: str) -> Optional["Tokenizer"]:
        """Load `tokenizer.json` (+ tokenizer_config.json, chat_template.jinja,
        special_tokens_map.json, generation_config.json) from an HF folder; None if absent."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            return None
        tokenizers = require("tokenizers", "reading tokenizer.json")
        try:
            tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:   # the tokenizers library raises a bare Exception for a corrupt file
            raise FileFormatError(f"lorart: {path}: not a readable tokenizer.json ({' '.join(str(e).split())[:300]})"
                                  ) from None
        cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        smap = _read_json(os.path.join(folder, "special_tokens_map.json"))
        gen = _read_json(os.path.join(folder, "generation_config.json"))
        get = lambda k: _token_str(cfg.get(k, smap.get(k)))  # noqa: E731
        template = cfg.get("chat_template")
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        eos = gen.get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
        bos = get("bos_token")
        add_bos = cfg.get("add_bos_token")
        if add_bos is None and bos is not None:  # e.g. Llama 3: BOS comes from the post-processor
            probe = tk.encode("a", add_special_tokens=True).ids
            add_bos = bool(probe) and probe[0] == tk.token_to_id(bos)
        return cls(tk, bos_token=bos, eos_token=get("eos_token"), pad_token=get("pad_token"),
                   chat_template=template, add_bos_token=bool(add_bos), extra_eos_ids=extra)

    def save(self, folder: str) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and, for transformers >= 5,
        chat_template.jinja; each written atomically."""
        from .._atomic import atomic_file

        with atomic_file(os.path.join(folder, "tokenizer.json")) as tmp:
            self.tk.save(tmp)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, "pad_token": self.pad_token,
               "add_bos_token": self.add_bos_token, "add_eos_token": False,
               "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
            with atomic_file(os.path.join(folder, "chat_template.jinja")) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(self.chat_template)
        with atomic_file(os.path.join(folder, "tokenizer_config.json")) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)


def _read_json(path: str) -> dict:
    return read_json(path, missing_ok=True)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")


# A chat template is code from the model folder: it renders in jinja2's sandbox under a work budget, so a
# template with nested loops (or a huge repeat) ends with an error instead of hanging or filling memory.
TEMPLATE_MAX_STEPS = 1_000_000       # lines of template code executed per render
TEMPLATE_MAX_SECONDS = 10.0
TEMPLATE_MAX_CHARS = 16 << 20        # the rendered text, and any one string or list built on the way


class _OverBudget(BaseException):     # BaseException: no `except Exception` in the template runtime eats it
    pass


def _check_size(value, what: str):
    n = len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0
    if n > TEMPLATE_MAX_CHARS:
        raise _OverBudget(f"{what} built a value of {n} items (the limit is {TEMPLATE_MAX_CHARS})")
    return value


_WIDE_FORMAT = re.compile(r"%[-+ #0]*\d{8,}|\{[^{}]*?\d{8,}[^{}]*\}")   # "%0999999999d", "{:>999999999}"


def _check_args(args, what: str) -> None:
    for x in args:
        if isinstance(x, int) and not isinstance(x, bool) and abs(x) > TEMPLATE_MAX_CHARS:
            raise _OverBudget(f"{what} was given the number {x} (the limit is {TEMPLATE_MAX_CHARS})")
        if isinstance(x, str) and _WIDE_FORMAT.search(x):
            raise _OverBudget(f"{what} was given a format with a huge width")


def render_bounded(template, variables: dict) -> str:
    """Render a compiled chat template within TEMPLATE_MAX_STEPS / _SECONDS / _CHARS (a ValueError beyond)."""
    import sys
    import time

    steps = [0]
    deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

    def local(frame, event, arg):
        if event == "line":
            steps[0] += 1
            if steps[0] > TEMPLATE_MAX_STEPS or (steps[0] % 1024 == 0 and time.monotonic() > deadline):
                raise _OverBudget(f"it ran more than {TEMPLATE_MAX_STEPS} steps or {TEMPLATE_MAX_SECONDS:g} s")
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        out, total = [], 0
        for chunk in template.generate(**variables):
            total += len(chunk)
            if total > TEMPLATE_MAX_CHARS:
                raise _OverBudget(f"its output passed {TEMPLATE_MAX_CHARS} characters")
            out.append(chunk)
        return "".join(out)
    except _OverBudget as e:
        raise InputError(f"lorart: chat_template: stopped, over its work budget ({e}); is the model's template "
                         "meant to do that?") from None
    except RecursionError:
        raise InputError("lorart: chat_template: stopped, it recursed too deeply") from None
    except Exception as e:
        import jinja2
        if isinstance(e, (jinja2.exceptions.TemplateError, jinja2.exceptions.SecurityError)):
            raise InputError(f"lorart: chat_template: {type(e).__name__}: {e}") from None
        raise
    finally:
        sys.settrace(previous)


def _compile_template(source: str):
    require("jinja2", "a chat template")
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):   # `a ~ b`: its result is checked too
            self.write("environment.bounded_concat(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = BoundedCodeGenerator

        @staticmethod
        def bounded_concat(value):
            return _check_size(value, "`~`")

        def call_binop(self, context, operator, left, right):
            if operator == "+" and all(isinstance(x, (str, list, tuple)) for x in (left, right)) and \
                    len(left) + len(right) > TEMPLATE_MAX_CHARS:
                raise _OverBudget("`+` built a value that is too large")
            if operator == "%":
                _check_args([left], "`%`")
            if operator == "**" and all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right)) \
                    and abs(left) > 1 and right * abs(left).bit_length() > 64 * TEMPLATE_MAX_CHARS:
                raise _OverBudget(f"`{left} ** {right}` is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise _OverBudget(f"repeating a value of length {len(seq)} {n} times is too large")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja2's own signature)
            bound = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)   # "...".format(...)
            _check_args([bound] + list(args) + list(kwargs.values()), "a call")
            return _check_size(super().call(__context, __obj, *args, **kwargs), "a call")

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def bounded(name, f):
        @functools.wraps(f)
        def g(*args, **kwargs):
            _check_args(list(args) + list(kwargs.values()), f"the filter `{name}`")
            return _check_size(f(*args, **kwargs), f"the filter `{name}`")
        return g

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.filters = {k: bounded(k, f) for k, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise FileFormatError(f"lorart: invalid chat_template: {e}") from None
    except _OverBudget as e:   # jinja2 folds constant filter calls while compiling
        raise InputError(f"lorart: chat_template: stopped, over its work budget ({e})") from None
