"""Records -> token ids and labels.

Record formats, detected per record by their keys (docs/train.md shows one example of each):
- `instruction` (Alpaca): {"instruction", "input"?, "output"}, rendered with the Alpaca prompt.
- `prompt_completion` (TRL): {"prompt": str, "completion": str}; the prompt as is.
- both: loss on the output / completion and a final EOS; the prompt is tokenized as at inference time.
- `chat` (OpenAI / TRL conversational): {"messages": [{"role", "content"}, ...]}
- `sharegpt`: {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], "system"?}
- `chat_prompt_completion` (TRL conversational): {"prompt": [turns], "completion": [turns]}
- all three: rendered with the tokenizer's chat template; loss on assistant turns only (each up to and
  including its EOS token, e.g. `<|im_end|>`); for chat_prompt_completion only the completion's turns.
  Turns may use role/content or from/value keys and ShareGPT's role names (human, gpt) in every format.
- `text`: {"text"}; loss on every token, EOS appended.

With `max_seq_len`, strings are cut before tokenizing to what `max_seq_len` tokens can cover (the
tokenizer's longest token times max_seq_len + 16 characters), so an over-long record costs a bounded amount
of memory and time; the kept tokens are those of the whole record truncated (if a cut string gives fewer
tokens than needed, e.g. a template strips it, the record is tokenized again with a 4x longer cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT and other role names -> the chat template's roles
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "tool": "tool"}
FORMATS = ("instruction", "prompt_completion", "chat", "sharegpt", "chat_prompt_completion", "text")


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class Example:
    input_ids: list
    labels: list
    source: str = ""  # "file:line"
    doc_lens: Optional[list] = None  # set for packed examples: lengths of the packed documents

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def record_format(rec: dict, where: str) -> str:
    """The format of one record (one of FORMATS), from its keys."""
    if "messages" in rec:
        return "chat"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "instruction"
    if "prompt" in rec and "completion" in rec:
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, list) and isinstance(c, list):
            return "chat_prompt_completion"
        if isinstance(p, str) and isinstance(c, str):
            return "prompt_completion"
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of turns, got "
                        f"{type(p).__name__} and {type(c).__name__}")
    if "text" in rec:
        return "text"
    if "chosen" in rec or "rejected" in rec:
        raise DataError(f"{where}: preference records (chosen/rejected) are for DPO-style training; lorart "
                        "trains on demonstrations: use 'messages', 'prompt'+'completion' or 'text'")
    if "prompt" in rec:
        raise DataError(f"{where}: a 'prompt' without a 'completion' (nothing to learn from)")
    raise DataError(f"{where}: unknown record format with keys {sorted(rec)}; expected "
                    "{'instruction', 'input'?, 'output'}, {'prompt', 'completion'}, {'messages'}, "
                    "{'conversations'} or {'text'}")


def _need_str(rec: dict, key: str, where: str, optional: bool = False) -> str:
    if key not in rec:
        if optional:
            return ""
        raise DataError(f"{where}: missing field {key!r}")
    v = rec[key]
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _turns(turns, field: str, where: str) -> list:
    """[{"role", "content"}] from role/content or from/value turns (ShareGPT role names mapped)."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {field!r} must be a non-empty list")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object, got {type(m).__name__}")
        # (a Parquet column of both layouts gives every turn all four keys, the unused ones None)
        rk, ck = ("from", "value") if m.get("role") is None and m.get("from") is not None else ("role", "content")
        role, content = m.get(rk), m.get(ck)
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise DataError(f"{where}: {field}[{i}].{rk} must be one of {tuple(ROLE_ALIASES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].{ck} must be a string, got {type(content).__name__}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def normalize(rec: dict, where: str) -> tuple:
    """`(format, kind, parts)`: kind "text" with (text,), "completion" with (prompt_text, completion) or
    "chat" with (messages, index of the first turn whose assistant replies are trained)."""
    fmt = record_format(rec, where)
    if fmt == "text":
        return fmt, "text", (_need_str(rec, "text", where),)
    if fmt == "instruction":
        prompt = alpaca_prompt(_need_str(rec, "instruction", where), _need_str(rec, "input", where, optional=True))
        return fmt, "completion", (prompt, _need_str(rec, "output", where))
    if fmt == "prompt_completion":
        return fmt, "completion", (rec["prompt"], rec["completion"])
    if fmt == "chat_prompt_completion":
        prompt, completion = _turns(rec["prompt"], "prompt", where), _turns(rec["completion"], "completion", where)
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError(f"{where}: 'completion' has no assistant turn (nothing to learn from)")
        return fmt, "chat", (prompt + completion, len(prompt))
    key = "messages" if fmt == "chat" else "conversations"
    msgs = _turns(rec[key], key, where)
    if fmt == "sharegpt" and rec.get("system") is not None:
        system = _need_str(rec, "system", where)
        if msgs[0]["role"] == "system":
            raise DataError(f"{where}: a 'system' field and a system turn; give one of them")
        msgs = [{"role": "system", "content": system}] + msgs
    return fmt, "chat", (msgs, 0)


def encode_record(rec: dict, tokenizer, where: str = "<record>", max_seq_len: Optional[int] = None) -> Example:
    """Tokenize one record; labels are IGNORE_INDEX on prompt tokens. With `max_seq_len` the strings are cut
    first (see the module docstring): the result is then the same only up to `max_seq_len` tokens."""
    return encode_normalized(normalize(rec, where), tokenizer, where, max_seq_len)


def encode_normalized(norm: tuple, tokenizer, where: str, max_seq_len: Optional[int] = None) -> Example:
    _fmt, kind, parts = norm
    if tokenizer.eos_id is None:
        raise DataError(f"{where}: the tokenizer has no EOS token")
    if max_seq_len is None:
        return _encode(kind, parts, tokenizer, where)
    limit = (max_seq_len + 16) * max(1, getattr(tokenizer, "max_token_chars", 256))
    while True:
        cut_parts, cut = _cut(kind, parts, limit)
        ex = _encode(kind, cut_parts, tokenizer, where)
        if not cut or len(ex) >= max_seq_len + 16:
            return ex
        limit *= 4


def _cut(kind: str, parts: tuple, limit: int) -> tuple:
    cut = False

    def c(s: str) -> str:
        nonlocal cut
        if len(s) > limit:
            cut = True
            return s[:limit]
        return s
    if kind == "chat":
        msgs, first = parts
        return ([{"role": m["role"], "content": c(m["content"])} for m in msgs], first), cut
    return tuple(c(s) for s in parts), cut


def _encode(kind: str, parts: tuple, tokenizer, where: str) -> Example:
    eos = tokenizer.eos_id
    if kind == "text":
        ids = tokenizer.encode(parts[0]) + [eos]
        return Example(ids, list(ids), where)
    if kind == "completion":
        prompt = tokenizer.encode(parts[0])
        answer = tokenizer.encode(parts[1], add_bos=False) + [eos]
        return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, where)
    return _encode_chat(parts[0], parts[1], tokenizer, where)


def _encode_chat(msgs: list, first: int, tokenizer, where: str) -> Example:
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: chat records need a tokenizer with a chat_template")
    if msgs[0]["role"] == "assistant":
        raise DataError(f"{where}: a conversation must not start with an assistant turn")
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= first]
    if not turns:
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    eos_text = tokenizer.eos_token
    ids, labels, done = [], [], ""
    for i in turns:
        prompt = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs[:i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render conversations as growing "
                            "prefixes, so assistant turns cannot be located")
        answer = full[len(prompt):]
        cut = answer.rfind(eos_text) if eos_text else -1
        if cut >= 0:
            answer = answer[:cut + len(eos_text)]
        p = tokenizer.encode(prompt[len(done):], add_bos=False)
        a = tokenizer.encode(answer, add_bos=False)
        if cut < 0:  # template without an EOS string: append the EOS id so generation learns to stop
            a = a + [tokenizer.eos_id]
        ids += p + a
        labels += [IGNORE_INDEX] * len(p) + a
        done = prompt + answer
    return Example(ids, labels, where)
