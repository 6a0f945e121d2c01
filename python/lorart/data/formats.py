"""JSONL records -> token ids and labels.

Three record formats, detected per line:
- instruction: {"instruction", "input" (optional), "output"} rendered with the Alpaca template;
  loss on the output and the final EOS.
- chat: {"messages": [{"role", "content"}, ...]} rendered with the tokenizer's chat template;
  loss on assistant turns only (each up to and including its EOS token, e.g. `<|im_end|>`).
- text: {"text"}; loss on every token, EOS appended.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


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


def read_jsonl(path: str) -> list:
    """Return `[(line_number, record_dict), ...]`; blank lines are skipped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            records.append((n, rec))
    if not records:
        raise DataError(f"{path}: the file has no records")
    return records


def record_format(rec: dict, where: str) -> str:
    if "messages" in rec:
        return "chat"
    if "instruction" in rec:
        return "instruction"
    if "text" in rec:
        return "text"
    raise DataError(f"{where}: unknown record format with keys {sorted(rec)}; expected "
                    "{'instruction', 'input'?, 'output'}, {'messages'} or {'text'}")


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


def encode_record(rec: dict, tokenizer, where: str = "<record>") -> Example:
    """Tokenize one record; labels are IGNORE_INDEX on prompt tokens."""
    fmt = record_format(rec, where)
    eos = tokenizer.eos_id
    if eos is None:
        raise DataError(f"{where}: the tokenizer has no EOS token")
    if fmt == "instruction":
        instruction = _need_str(rec, "instruction", where)
        inp = _need_str(rec, "input", where, optional=True)
        output = _need_str(rec, "output", where)
        prompt = tokenizer.encode(alpaca_prompt(instruction, inp))
        answer = tokenizer.encode(output, add_bos=False) + [eos]
        return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, where)
    if fmt == "text":
        ids = tokenizer.encode(_need_str(rec, "text", where)) + [eos]
        return Example(ids, list(ids), where)
    return _encode_chat(rec["messages"], tokenizer, where)


def _encode_chat(messages, tokenizer, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got "
                            f"{type(content).__name__}")
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: chat records need a tokenizer with a chat_template")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    if turns[0] == 0:
        raise DataError(f"{where}: messages must not start with an assistant message")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
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
