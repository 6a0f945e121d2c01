"""Every record format in every container gives the same tokens and labels; folders, globs; file:line errors
for bad bytes and bad structure; over-long records are cut before tokenizing (real SmolLM2 tokenizer)."""
import csv
import json
import os

import pytest

from lorart.data import DataError, encode_record, load_examples, read_records
from lorart.models import Tokenizer


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model[1]


SYS = "Be brief."
TURNS = [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6, of course.")]
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def _messages(turns, system=SYS):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": c} for r, c in turns]


def _chat_variants(turns):
    """The same conversation in every chat-like record format (all assistant turns trained)."""
    msgs = _messages(turns)
    fv = [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in msgs]
    return {
        "messages": {"messages": msgs},
        "messages_from_value": {"messages": fv},
        "sharegpt": {"conversations": fv},
        "sharegpt_role_content": {"conversations": msgs},
        "sharegpt_system_field": {"system": SYS, "conversations": fv[1:]},
    }


def _write(path, kind, records):
    path = str(path)
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif kind == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)
    elif kind == "csv":
        cols = sorted({k for r in records for k in r})
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in records:
                w.writerow([json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c, "") for c in cols])
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        cols = sorted({k for r in records for k in r})  # from_pylist would take the first row's keys only
        pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in records] for c in cols}), path)
    return path


def _same(a, b):
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    assert [e.labels for e in a] == [e.labels for e in b]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_one_conversation_every_format_same_tokens_and_labels(tok, tmp_path, kind):
    ref = encode_record({"messages": _messages(TURNS)}, tok)
    targets = tok.decode([t for t in ref.labels if t != -100])
    assert targets == "4<|im_end|>6, of course.<|im_end|>"
    variants = _chat_variants(TURNS)
    single = _chat_variants(TURNS[:2])
    ref1 = encode_record({"messages": _messages(TURNS[:2])}, tok)
    for name, rec in variants.items():
        got = load_examples(_write(tmp_path / f"{name}.{kind}", kind, [rec, single[name]]), tok)
        _same(got.examples, [ref, ref1])
        fmt = "chat" if name.startswith("messages") else "sharegpt"
        assert got.files[0].formats == {fmt: 2} and got.files[0].container == kind
    # TRL conversational prompt/completion: the completion's assistant turns are trained, the prompt's are not
    msgs = _messages(TURNS)
    pc = {"prompt": msgs[:4], "completion": msgs[4:]}
    pc1 = {"prompt": msgs[:2], "completion": msgs[2:3]}
    if kind == "csv":
        return  # CSV cells are strings: conversational prompt/completion needs JSON, JSONL or Parquet
    got = load_examples(_write(tmp_path / f"pc.{kind}", kind, [pc, pc1]), tok)
    assert got.files[0].format == "chat_prompt_completion"
    assert [e.input_ids for e in got.examples] == [ref.input_ids, ref1.input_ids]
    assert got.examples[1].labels == ref1.labels
    first_answer = len(tok.apply_chat_template(msgs[:3], tokenize=True)) - 1  # "4<|im_end|>" is context now
    assert got.examples[0].labels[:first_answer] == [-100] * first_answer
    assert got.examples[0].labels[first_answer:] == ref.labels[first_answer:]
    assert tok.decode([t for t in got.examples[0].labels if t != -100]) == "6, of course.<|im_end|>"


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_prompt_completion_and_instruction_every_container(tok, tmp_path, kind):
    recs = [{"prompt": "The capital of France is", "completion": " Paris."},
            {"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "output": "hi"},  # no input: an empty CSV cell is the same
            {"text": "Plain prose."}]
    got = load_examples(_write(tmp_path / f"d.{kind}", kind, recs), tok)
    p = tok.encode("The capital of France is")
    a = tok.encode(" Paris.", add_bos=False) + [tok.eos_id]
    assert got.examples[0].input_ids == p + a and got.examples[0].labels == [-100] * len(p) + a
    _same(got.examples, [encode_record(r, tok) for r in recs])
    assert got.files[0].formats == {"prompt_completion": 1, "instruction": 2, "text": 1}
    assert got.files[0].format == "mixed: instruction, prompt_completion, text"


def test_in_memory_records_and_iterables(tok):
    recs = list(_chat_variants(TURNS).values())
    ref = load_examples(recs, tok).examples
    _same(load_examples((r for r in recs), tok).examples, ref)  # any iterable of dicts (e.g. datasets.Dataset)
    got = load_examples(tuple(recs), tok, what="eval_data")
    assert got.files[0].describe()["container"] == "records" and got.files[0].format == "mixed: chat, sharegpt"
    with pytest.raises(TypeError, match="DatasetDict: pass one split"):
        load_examples({"train": recs}, tok)
    with pytest.raises(DataError, match=r"argument `data`: record 1 must be a dict, got str"):
        load_examples([recs[0], "x"], tok)


def test_folder_and_glob(tok, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "b.jsonl", "jsonl", [{"text": "b"}])
    _write(d / "a.json", "json", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    _write(d / "c.csv", "csv", [{"prompt": "p", "completion": "c"}])
    (d / "notes.txt").write_text("not data")
    (d / ".hidden.jsonl").write_text("broken")
    (d / "sub").mkdir()
    got = load_examples(str(d), tok)
    assert [(os.path.basename(f.path), f.container, f.format) for f in got.files] == [
        ("a.json", "json", "sharegpt"), ("b.jsonl", "jsonl", "text"), ("c.csv", "csv", "prompt_completion")]
    assert [e.source for e in got.examples] == [f"{d}/a.json:2", f"{d}/b.jsonl:1", f"{d}/c.csv:2"]
    assert [f.path for f in load_examples(str(d / "*.js*"), tok).files] == [f"{d}/a.json", f"{d}/b.jsonl"]
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        load_examples(str(d / "*.parquet"), tok)
    with pytest.raises(DataError, match="holds no data files"):
        load_examples(str(d / "sub"), tok)


def _raw(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("name, data, pattern", [
    ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"),
    ("d.json", b'[\n {"text": "ok"},\n {"text": "\xff"}\n]', r"d\.json:3: not UTF-8 text \(byte 0xff"),
    ("d.csv", b'text\nok\n"multi\nline"\n\xfe\n', r"d\.csv:5: not UTF-8 text \(byte 0xfe"),
    ("d.jsonl", '{"text": "x"}\n'.encode("utf-16"), r"d\.jsonl:1: the file is UTF-16 text"),
    ("d.json", b'[\n {"text": "a"},\n {"text": oops}\n]', r"d\.json:3: invalid JSON"),
    ("d.json", b'[\n {"text": "a"},\n\n "b"\n]', r"d\.json:4: array element 1 must be a JSON object"),
    ("d.json", b'[{"text": "a"}\n {"text": "b"}]', r"d\.json:2: invalid JSON \(expected ',' or '\]'"),
    ("d.json", b'[{"text": "a"}] x', r"d\.json:1: invalid JSON \(extra data"),
    ("d.json", b'[]', r"d\.json: the file has no records"),
    ("d.json", b'{\n "text": "a"\n}\n', r"d\.json:1: invalid JSON"),
    ("d.jsonl", b'[{"text": "a"}]\n', r"d\.jsonl:1: expected a JSON object, got list \(a JSON array of records"),
    ("d.csv", b'text,extra\n"a\nb",1\nc\n', r"d\.csv:4: 1 fields, the header has 2"),
    ("d.csv", b'text,text\na,b\n', r"d\.csv:1: the header needs distinct"),
    ("d.csv", b'messages\n[{"role": "user"\n', r"d\.csv:2: column 'messages' must hold a JSON list"),
    ("d.csv", b'question\nwhat\n', r"d\.csv:2: unknown record format with keys \['question'\]"),
    ("d.parquet", b'PAR1 not really', r"d\.parquet: not a readable Parquet file"),
    ("d.jsonl", b'{"text": "a"}\n' + b"[" * 100000 + b"\n", r"d\.jsonl:2: (JSON nested too deeply|invalid JSON)"),
])
def test_bad_bytes_and_structure_name_file_and_line(tok, tmp_path, name, data, pattern):
    with pytest.raises(DataError, match=pattern):
        load_examples(_raw(tmp_path, name, data), tok)


def test_utf8_bom_is_accepted(tok, tmp_path):
    bom = b"\xef\xbb\xbf"
    for name, body in (("a.jsonl", b'{"text": "hi"}\n'), ("b.json", b'[{"text": "hi"}]'), ("c.csv", b"text\nhi\n")):
        kind, recs = read_records(_raw(tmp_path, name, bom + body))
        assert recs == [(recs[0][0], {"text": "hi"})]
    assert read_records(str(tmp_path / "c.csv"))[1][0][0] == 2


class _CountingTokenizer(Tokenizer):
    longest = 0

    def encode(self, text, add_bos=None):
        type(self).longest = max(type(self).longest, len(text))
        return super().encode(text, add_bos)


def _counting(tok, template=None):
    return _CountingTokenizer(tok.tk, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                              chat_template=template or tok.chat_template, add_bos_token=tok.add_bos_token)


def test_over_long_records_are_cut_before_tokenizing(tok, tmp_path):
    prose = "The quick brown fox jumps over the lazy dog; 12345 times!\n" * 40
    weird = " " * 3000 + "x" * 5000 + "\n\n\t" * 500 + "é✓🙂" * 1000
    n = 48
    for body in (prose, weird, prose + weird):
        for rec in ({"text": body}, {"prompt": "Q:", "completion": body}, {"prompt": body, "completion": "A"},
                    {"messages": [{"role": "user", "content": body}, {"role": "assistant", "content": body}]},
                    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": body}]}):
            whole = encode_record(rec, tok)
            cut = encode_record(rec, tok, max_seq_len=n)
            assert len(whole) > n
            assert cut.input_ids[:n] == whole.input_ids[:n] and cut.labels[:n] == whole.labels[:n]
    # a 20 MB line: the tokenizer never sees more than (max_seq_len + 16) x the longest token's characters
    big = _write(tmp_path / "big.jsonl", "jsonl", [{"messages": [{"role": "user", "content": "q " * 10_000_000},
                                                                   {"role": "assistant", "content": "a"}]},
                                                     {"text": "y" * 20_000_000}])
    ctok = _counting(tok)
    with pytest.warns(UserWarning, match="2 of 2 examples were longer than max_seq_len=64"):
        got = load_examples(big, ctok, max_seq_len=64)
    assert [len(e) for e in got.examples] == [64]  # the chat lost its answer: dropped
    assert got.files[0].dropped == 1
    assert _CountingTokenizer.longest <= (64 + 16) * tok.max_token_chars + 500  # + the template's own text


def test_cut_falls_back_when_a_template_strips_the_text(tok):
    strip = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ctok = _counting(tok, strip)
    rec = {"messages": [{"role": "user", "content": " " * 200_000 + "hello " * 50},
                        {"role": "assistant", "content": "ok"}]}
    whole = encode_record(rec, ctok)
    assert encode_record(rec, ctok, max_seq_len=40).input_ids[:40] == whole.input_ids[:40]


def test_parquet_column_mixing_turn_layouts(tok, tmp_path):
    v = _chat_variants(TURNS[:2])
    recs = [v["messages"], v["messages_from_value"]]
    got = load_examples(_write(tmp_path / "mixed.parquet", "parquet", recs), tok)  # turns get all four keys
    ref = encode_record(v["messages"], tok)
    _same(got.examples, [ref, ref])


def test_dataframe_hint(tok):
    class FakeFrame(list):  # iterates its column names, like pandas
        columns = ["text"]
    with pytest.raises(DataError, match=r"pandas DataFrame: pass df\.to_dict\('records'\)"):
        load_examples(FakeFrame(["text"]), tok)
