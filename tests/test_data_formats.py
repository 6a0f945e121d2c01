"""Data formats, label masks, truncation, bad-data errors (real SmolLM2 tokenizer)."""
import json
import re
import warnings

import pytest

from lorart.data import DataError, alpaca_prompt, encode_record, load_jsonl

IM_END = 2


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model[1]


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


def _target_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != -100])


def test_alpaca_template_and_labels(tok):
    ex = encode_record({"instruction": "Add.", "input": "2 and 3", "output": "5"}, tok)
    prompt = "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert alpaca_prompt("Add.", "2 and 3") == prompt
    n = len(tok.encode(prompt))
    assert ex.input_ids == tok.encode(prompt) + tok.encode("5") + [IM_END]
    assert ex.labels[:n] == [-100] * n and ex.labels[n:] == tok.encode("5") + [IM_END]
    no_input = encode_record({"instruction": "Say hi.", "output": "hi"}, tok)
    assert tok.decode(no_input.input_ids) == "### Instruction:\nSay hi.\n\n### Response:\nhi<|im_end|>"


def test_chat_loss_on_assistant_turns_only(tok):
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    ex = encode_record({"messages": msgs}, tok)
    full = tok.apply_chat_template(msgs)
    assert tok.decode(ex.input_ids) == full.rstrip("\n")  # ends at the final <|im_end|>
    assert _target_text(tok, ex) == "A1<|im_end|>A2<|im_end|>"
    assert ex.input_ids[-1] == IM_END and ex.labels[-1] == IM_END
    assert ex.labels[0] == -100 and len(ex.labels) == len(ex.input_ids)
    # the prompt part is tokenized exactly as at inference time
    gen_prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True)
    assert ex.input_ids[:len(gen_prompt)] == gen_prompt


def test_text_format_loss_everywhere(tok):
    ex = encode_record({"text": "Plain prose here."}, tok)
    assert ex.input_ids == tok.encode("Plain prose here.") + [IM_END] and ex.labels == ex.input_ids


def test_truncation_warns_with_count_and_file(tok, tmp_path):
    long = {"instruction": "Repeat.", "output": "word " * 100}
    p = _write(tmp_path, [long, {"text": "short"}, long])
    with pytest.warns(UserWarning, match=r"d\.jsonl: 2 of 3 examples were longer than max_seq_len=32"):
        exs = load_jsonl(p, tok, max_seq_len=32)
    assert [len(e) for e in exs] == [32, 2, 32] and exs[0].source.endswith("d.jsonl:1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_jsonl(p, tok, max_seq_len=4096)  # no warning when nothing is truncated


def test_truncation_drops_examples_without_targets(tok, tmp_path):
    p = _write(tmp_path, [{"instruction": "x " * 50, "output": "y"}, {"text": "ok"}])
    with pytest.warns(UserWarning, match="1 had no target tokens left and were dropped"):
        assert len(load_jsonl(p, tok, max_seq_len=8)) == 1


@pytest.mark.parametrize("rows, pattern", [
    (['{"text": "ok"}', '{"text": oops}'], r"d\.jsonl:2: invalid JSON"),
    ([{"instruction": "x"}], r"d\.jsonl:1: missing field 'output'"),
    ([{"instruction": "x", "output": 3}], r"d\.jsonl:1: field 'output' must be a string, got int"),
    ([{"text": "a"}, {"question": "x"}], r"d\.jsonl:2: unknown record format"),
    ([{"text": "a"}, {"prompt": "x"}], r"d\.jsonl:2: a 'prompt' without a 'completion'"),
    ([{"prompt": "x", "chosen": "a", "rejected": "b"}], r"d\.jsonl:1: preference records"),
    ([{"prompt": "x", "completion": [{"role": "assistant", "content": "a"}]}],
     r"d\.jsonl:1: 'prompt' and 'completion' must both be strings or both lists"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}],
     r"d\.jsonl:1: conversations\[1\]\.from must be one of"),
    ([{"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]}],
     r"d\.jsonl:1: a conversation must not start with an assistant turn"),
    ([{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}],
     r"d\.jsonl:1: 'completion' has no assistant turn"),
    (["[1, 2]"], r"d\.jsonl:1: expected a JSON object, got list"),
    ([{"messages": "hi"}], r"d\.jsonl:1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user", "content": "q"}]}], r"d\.jsonl:1: no assistant message"),
    ([{"messages": [{"role": "bot", "content": "q"}]}], r"d\.jsonl:1: messages\[0\]\.role"),
    ([{"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}],
     r"messages\[0\]\.content must be a string"),
    (["", "  "], r"d\.jsonl: the file has no records"),
])
def test_bad_data_errors_name_file_and_line(tok, tmp_path, rows, pattern):
    with pytest.raises(DataError, match=pattern):
        load_jsonl(_write(tmp_path, rows), tok)


def test_missing_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(str(tmp_path / "nope.jsonl"), tok)


def test_default_dataset_contents(tok):
    from lorart.data import default_dataset_paths, read_jsonl
    paths = default_dataset_paths()
    train = [r for _, r in read_jsonl(paths["train"])]
    held = [r for _, r in read_jsonl(paths["heldout"])]
    assert 300 <= len(train) <= 400 and 30 <= len(held) <= 60
    assert 30 <= len(read_jsonl(paths["general"])) <= 60
    pat = re.compile(r"ANSWER: [^|\n]+ \| CONFIDENCE: (high|medium|low)")
    answers = [m["content"] for r in train + held for m in r["messages"] if m["role"] == "assistant"]
    assert all(pat.fullmatch(a) for a in answers)
    train_q = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    assert not train_q & {m["content"] for r in held for m in r["messages"] if m["role"] == "user"}
    for name in ("train", "heldout", "general"):
        assert len(load_jsonl(paths[name], tok, max_seq_len=256)) > 0
