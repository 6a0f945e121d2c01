"""Every failure the CLI can meet is one line `lorart: error: ...`: exit 2 for bad input or environment (lying
files, bad options, a full disk, a read-only folder), exit 1 with "internal error" for a bug in lorart
(LORART_DEBUG=1 shows the traceback). Runs `lorart.__main__.main` in-process (fast) and a few real processes."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import lorart

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

PYDIR = os.path.dirname(os.path.dirname(lorart.__file__))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("clierr")
    model = tiny_folder(root / "model")
    (root / "empty").mkdir()
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(8)))
    return {"root": root, "model": model, "data": str(data)}


def _variant(env, name, edit) -> str:
    d = env["root"] / name
    if not d.exists():
        shutil.copytree(env["model"], d)
        edit(str(d))
    return str(d)


def _edit_json(file, **changes):
    def f(d):
        p = os.path.join(d, file)
        obj = json.load(open(p))
        obj.update(changes)
        json.dump(obj, open(p, "w"))
    return f


def _write(file, text):
    def f(d):
        with open(os.path.join(d, file), "w") as fh:
            fh.write(text)
    return f


def _truncate(file):
    def f(d):
        p = os.path.join(d, file)
        os.truncate(p, os.path.getsize(p) // 2)
    return f


def _index(weight_map):
    def f(d):
        wm = weight_map(d) if callable(weight_map) else weight_map
        if callable(weight_map) and os.path.exists(os.path.join(d, "model.safetensors")):
            os.remove(os.path.join(d, "model.safetensors"))
        json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    return f


def _outside(d):
    """An index whose entries name the real weights by an absolute path in another folder."""
    from safetensors import safe_open

    other = d + "-weights"
    os.makedirs(other, exist_ok=True)
    shutil.copy(os.path.join(d, "model.safetensors"), other)
    with safe_open(os.path.join(other, "model.safetensors"), "pt") as f:
        return {k: os.path.join(other, "model.safetensors") for k in f.keys()}


def _dotdot(d):
    from safetensors import safe_open

    other = d + "-up"
    os.makedirs(other, exist_ok=True)
    shutil.move(os.path.join(d, "model.safetensors"), other)
    with safe_open(os.path.join(other, "model.safetensors"), "pt") as f:
        return {k: f"../{os.path.basename(other)}/model.safetensors" for k in f.keys()}


def _int_weights(d):
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(d, "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, os.path.join(d, "model.safetensors"))


NESTED_LOOPS = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
                "{% endfor %}{% endfor %}{% endfor %}")

MODEL_CASES = {
    "corrupt model.safetensors": (_truncate("model.safetensors"), "model.safetensors: not a readable safetensors"),
    "integer weights": (_int_weights, "tensor 'model.norm.weight': expected a floating-point dtype, got int32"),
    "corrupt tokenizer.json": (_write("tokenizer.json", '{"version": "1.0", "model": {'),
                               "tokenizer.json: not a readable tokenizer.json"),
    "100k-deep config.json": (_write("config.json", "[" * 100000 + "]" * 100000), "nesting deeper than 64"),
    "NaN in config.json": (_write("config.json", '{"rms_norm_eps": NaN}'), "config.json: not valid JSON"),
    "fractional layer count": (_edit_json("config.json", num_hidden_layers=2.5), "key `num_hidden_layers`"),
    "bool as a string": (_edit_json("config.json", tie_word_embeddings="true"), "key `tie_word_embeddings`"),
    "corrupt tokenizer_config.json": (_write("tokenizer_config.json", "{"), "tokenizer_config.json: not valid JSON"),
    "weight_map outside the folder": (_index(_outside), "in the model folder, got"),
    "weight_map with dotdot": (_index(_dotdot), "points outside the model folder"),
    "weight_map not a string": (_index({"model.norm.weight": 5}), "key `weight_map.model.norm.weight`"),
    "weight_map a list": (_index(["model.safetensors"]), "key `weight_map`"),
    "template with nested loops": (_write("chat_template.jinja", NESTED_LOOPS), "work budget"),
    "template raising": (_write("chat_template.jinja", "{{ raise_exception('no user role') }}"),
                         "chat_template: TemplateError: no user role"),
    "template syntax": (_write("chat_template.jinja", "{% for %}"), "invalid chat_template"),
    "template in tokenizer_config": (lambda d: (os.remove(os.path.join(d, "chat_template.jinja")),
                                                _edit_json("tokenizer_config.json", chat_template=NESTED_LOOPS)(d)),
                                     "work budget"),
}


def _main(argv, capsys, monkeypatch):
    from lorart.__main__ import main

    monkeypatch.delenv("LORART_DEBUG", raising=False)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:   # argparse
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def _one_line(rc, err, code=2):
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and lines[0].startswith("lorart: error: "), (rc, err)
    return lines[0]


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_lying_model_folders(env, case, capsys, monkeypatch):
    edit, message = MODEL_CASES[case]
    model = _variant(env, case.replace(" ", "_"), edit)
    t0 = time.perf_counter()
    rc, err = _main(["generate", "--model", model, "--max-new-tokens", "1", "hi"], capsys, monkeypatch)
    line = _one_line(rc, err)
    assert message in line and "internal error" not in line
    assert time.perf_counter() - t0 < 60   # the nested-loop template is stopped, not left to hang


BAD_OPTIONS = [
    (["generate", "--temperature", "nan", "hi"], "argument --temperature: expected a finite number >= 0"),
    (["generate", "--temperature", "inf", "hi"], "argument --temperature"),
    (["generate", "--top-p", "0", "hi"], "argument --top-p: expected a finite number in (0, 1]"),
    (["generate", "--max-new-tokens", "-1", "hi"], "argument --max-new-tokens: expected an integer >= 0"),
    (["generate", "--device", "tpu", "hi"], "argument --device: expected 'auto', 'cpu' or 'cuda[:N]'"),
    (["eval", "--format-regex", "(["], "argument --format-regex: invalid regular expression"),
    (["eval", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["eval", "--max-seq-len", "1"], "argument --max-seq-len: expected an integer >= 2"),
    (["eval", "--num-samples", "-3"], "argument --num-samples"),
    (["eval", "--data", "{root}/empty"], "the folder holds no data files"),
    (["eval", "--data", "{root}/none.jsonl"], "no such data file"),
    (["train", "--lr", "nan"], "argument --lr: expected a finite number > 0"),
    (["train", "--dropout", "2"], "argument --dropout"),
    (["train", "--format-regex", "(["], "argument --format-regex: invalid regular expression"),
    (["train", "--batch-size", "many"], "argument --batch-size: invalid int value"),
    (["generate", "--model", "{root}/nothing", "hi"], "no such model folder or file"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS)
def test_bad_options(env, argv, message, capsys, monkeypatch):
    argv = [a.format(root=env["root"]) for a in argv]
    if "--model" not in argv:
        argv[1:1] = ["--model", env["model"]]
    if argv[0] == "train":
        argv += ["--data", env["data"], "--output-dir", str(env["root"] / "o"), "--max-steps", "1", "--no-general"]
    rc, err = _main(argv, capsys, monkeypatch)
    line = _one_line(rc, err)
    assert message in line, line


def test_internal_errors_say_so_and_keep_the_traceback(env, capsys, monkeypatch):
    import lorart.cli as cli

    def boom(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "_reply", boom)
    rc, err = _main(["generate", "--model", env["model"], "hi"], capsys, monkeypatch)
    line = _one_line(rc, err, code=1)
    assert "internal error: RuntimeError: a bug at test_cli_errors.py:" in line and "bug in lorart" in line
    monkeypatch.setenv("LORART_DEBUG", "1")
    from lorart.__main__ import main
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--model", env["model"], "hi"])


def test_write_errors_are_named(tmp_path, monkeypatch):
    """Disk full and read-only folders from any writer: OutputError naming the target, nothing left behind."""
    from lorart import errors
    from lorart._atomic import atomic_dir, atomic_file
    from lorart.training.checkpoint import save_checkpoint

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(errors.OutputError, match=r"cannot write .*x\.json: no space left on the device"):
        with atomic_file(str(tmp_path / "x.json")) as tmp:
            enospc()
    with pytest.raises(errors.OutputError, match="read-only file system"):
        with atomic_dir(str(tmp_path / "d")):
            raise OSError(errno.EROFS, "Read-only file system")
    # torch.save reports a full disk as "unexpected pos": recognised by the free space left
    monkeypatch.setattr(errors, "free_bytes", lambda p: 0)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unexpected pos 1 vs 2")))
    with pytest.raises(errors.OutputError, match=r"step-0000003: no space left on the device \(0 bytes free"):
        save_checkpoint(str(tmp_path / "run"), 3, {"x": 1})
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(tmp_path / "run" / "checkpoints") == []


def _cli(*args, timeout=300):
    e = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    e.pop("LORART_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lorart", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout)


def _mount(where, opts) -> bool:
    os.makedirs(where, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_train_into_a_full_or_read_only_disk(env, kind, tmp_path):
    """A real `lorart train` on a real file system: one line, exit 2, no temporary files left."""
    where = tmp_path / "mnt"
    mounted = _mount(where, "size=40k" if kind == "full" else "ro,size=64k")
    if not mounted:
        if kind == "full" or os.geteuid() == 0:
            pytest.skip("needs root to mount a small tmpfs")
        where.mkdir(exist_ok=True)
        where.chmod(0o555)   # read-only for a normal user
    try:
        p = _cli("train", "--model", env["model"], "--data", env["data"], "--max-steps", "2", "--batch-size", "2",
                 "--max-seq-len", "32", "--num-samples", "1", "--sample-max-new-tokens", "2", "--no-general",
                 "--quiet", "--r", "2", "--output-dir", where / "out")
        line = _one_line(p.returncode, p.stderr)
        assert ("no space left on the device" if kind == "full" else
                ("read-only file system" if mounted else "permission denied")) in line, line
        left = [os.path.join(r, f) for r, ds, fs in os.walk(where) for f in fs + ds if ".tmp" in f]
        assert left == []
    finally:
        if mounted:
            subprocess.run(["umount", str(where)])
