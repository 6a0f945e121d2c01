"""`python -m lorart train|generate|eval|chat` on a tiny model folder, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import lorart

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

PYDIR = os.path.dirname(os.path.dirname(lorart.__file__))  # the lorart this test imports (installed or in-tree)


def lorart_cli(*args, cwd=None, stdin=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = PYDIR + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, "-m", "lorart", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = tiny_folder(d / "model")
    out = d / "out"
    p = lorart_cli("train", "--model", model, "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "64",
                   "--num-samples", "2", "--sample-max-new-tokens", "4", "--no-general", "--output-dir", out,
                   "--r", "4", "--targets", "q_proj,v_proj")
    assert p.returncode == 0, p.stderr
    return model, out, p


def test_train_subcommand(trained):
    model, out, p = trained
    # not a TTY: one progress line per step, then the before/after table
    assert "[" in p.stderr and "2/2 loss" in p.stderr and "held-out loss" in p.stderr
    assert "\r" not in p.stderr
    cfg = json.load(open(out / "adapter" / "adapter_config.json"))
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 2 and summary["options"]["max_seq_len"] == 64


def test_generate_and_eval(trained):
    model, out, _ = trained
    p = lorart_cli("generate", "--model", model, "--adapter", out / "adapter", "--max-new-tokens", "5",
                   "What is the capital of France?")
    assert p.returncode == 0, p.stderr
    import lorart
    m, tok = lorart.models.load_model(model)
    lorart.load_adapter(m, str(out / "adapter"))
    m.eval()
    expected = lorart.models.chat(m, tok, "What is the capital of France?", max_new_tokens=5)[0]
    assert p.stdout == expected + "\n"
    p = lorart_cli("eval", "--model", model, "--adapter", out / "adapter", "--num-samples", "2",
                   "--max-new-tokens", "4")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["examples"] == 41 and res["loss"] > 0 and res["format_accuracy"] is not None
    p0 = lorart_cli("eval", "--model", model, "--num-samples", "0")
    assert json.loads(p0.stdout)["loss"] != res["loss"]  # the adapter changed the model


def test_chat_exits_on_eof(trained):
    model, _, _ = trained
    p = lorart_cli("chat", "--model", model, "--max-new-tokens", "3", stdin="hello\nagain\n")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent/x.jsonl", "--model", "{model}"], "no such data file"),
    (["train", "--model", "/nonexistent/model"], "no such model folder or file"),
    (["train", "--model", "{model}", "--lr", "-1"], "argument --lr"),
    (["train", "--model", "{model}", "--data", "{bad}"], "bad.jsonl:1: invalid JSON"),
    (["train", "--model", "{model}", "--data", "{latin1}"], "latin1.csv:3: not UTF-8 text (byte 0xe9 at column 4)"),
    (["generate", "--model", "{model}", "--adapter", "/nonexistent/ad", "hi"], "adapter_config.json"),
])
def test_user_errors_are_one_line(trained, tmp_path, args, message):
    model, _, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("prompt,completion\nhi,there\ncaf\u00e9,ok\n".encode("latin-1"))
    args = [a.format(model=model, bad=bad, latin1=latin1) for a in args]
    p = lorart_cli(*args, "--output-dir", tmp_path / "o") if args[0] == "train" else lorart_cli(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorart: error:"), p.stderr
    assert message in err[0]
    assert "Traceback" not in p.stderr


def test_bad_flag_exits_2(tmp_path):
    p = lorart_cli("train", "--batch-size", "many")
    assert p.returncode == 2 and "invalid int value" in p.stderr
