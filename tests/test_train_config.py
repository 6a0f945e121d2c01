"""`lorart train --config run.yaml|run.json`: strict keys and types, the command line overrides the file, and the
`config.yaml` every run writes repeats the run."""
from __future__ import annotations

import json
import os
import sys

import pytest

import lorart.training
from lorart.errors import FileFormatError
from lorart.training.config import dump_config, merge_config, read_config

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

pytest.importorskip("yaml")


def _file(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_yaml_values_read_with_the_yaml_1_2_core_schema(tmp_path):
    cfg = read_config(_file(tmp_path, "lr: 2e-4\nr: 010\nwarmup: 3\nmin_lr_ratio: .5\ntargets: q_proj, v_proj\n"
                                      "method_options: {init_text: no, bottleneck: 8}\ndtype: null\nseed: -1\n"
                                      "format_regex: 'yes'\n"))
    assert cfg["lr"] == 2e-4 and isinstance(cfg["lr"], float)      # pyyaml's YAML 1.1 reads 2e-4 as a string
    assert cfg["r"] == 10                                           # decimal, not YAML 1.1's octal 8
    assert cfg["warmup"] == 3 and isinstance(cfg["warmup"], int) and cfg["min_lr_ratio"] == 0.5
    assert cfg["targets"] == ("q_proj", "v_proj")                   # as --targets reads it
    assert cfg["method_options"] == {"init_text": "no", "bottleneck": 8}   # `no` stays a string
    assert cfg["dtype"] is None and cfg["seed"] == -1 and cfg["format_regex"] == "yes"
    with pytest.raises(FileFormatError, match="key `model`: expected a string, got 100000.0"):
        read_config(_file(tmp_path, "model: 1e5\n", "m.yaml"))


def test_json_and_empty_files(tmp_path):
    assert read_config(_file(tmp_path, '{"max_steps": 3, "targets": ["q_proj"]}', "run.json")) == {
        "max_steps": 3, "targets": ["q_proj"]}
    assert read_config(_file(tmp_path, "# nothing yet\n")) == {}


BAD = [
    ("r: 16.0\n", "key `r`: expected an integer, got 16.0"),
    ('r: "16"\n', 'key `r`: expected an integer, got "16" (a string)'),
    ("r: 0\n", "key `r`: expected an int >= 1, got 0"),
    ("r: true\n", "key `r`: expected an integer, got true"),
    ("rslora: yes\n", 'key `rslora`: expected true or false, got "yes"'),
    ("lr: .inf\n", "key `lr`: expected a finite number"),
    ("lr: -1\n", "key `lr`: expected a finite number >= 0, got -1"),
    ("epochs: null\n", "key `epochs`: expected an integer, got null"),
    ("max_steps: 2.5\n", "key `max_steps`: expected an integer, got 2.5"),
    ("warmup: '3'\n", "key `warmup`: expected a finite number"),
    ("schedule: cosin\n", "key `schedule`: expected 'cosine', 'linear' or 'constant', got 'cosin'"),
    ("report_to: neptune\n", "key `report_to`: expected 'none' or some of tensorboard, wandb, mlflow, got 'neptune'"),
    ("targets: [q_proj, 3]\n", "key `targets`: expected a list of strings"),
    ("method_options: 3\n", "key `method_options`: expected a mapping of the method's options"),
    ("format_regex: '(['\n", "key `format_regex`: invalid regex"),
    ("model: [a]\n", "key `model`: expected a string"),
    ("general_data: 1\n", "key `general_data`: expected a string"),
    ("general_data: no\n", "key `general_data`: expected true, false or a data file (YAML 1.2: `no`"),
    ("device: tpu\n", "key `device`: expected 'auto', 'cpu' or 'cuda[:N]', got \"tpu\""),
    ("device: 'cuda:x'\n", "key `device`: expected 'auto', 'cpu' or 'cuda[:N]'"),
    ("output_dir: ''\n", "key `output_dir`: expected a folder"),
    ("bogus: 1\n", "unknown key `bogus`"),
    ("max_step: 3\n", "unknown key `max_step` (did you mean `max_steps`?)"),
    ("extra: {}\n", "unknown key `extra`"),
    ("resume: true\n", "key `resume`: not a config key; pass --resume on the command line"),
    ("r: 4\nr: 8\n", "duplicate key 'r'"),
    ("lr: 1e-3\nr: &x 4\nalpha: *x\n", "anchors and aliases are not supported"),
    ("r: [1\n", "not valid YAML ("),
    ("- r\n- 4\n", "expected a mapping of keys to values, got list"),
    ("? [a]\n: 1\n", "a key must be a string"),
    ("3: 1\n", "key 3: keys must be strings"),
    ("r: !!python/object:os.system 1\n", "not valid YAML"),
    ("\udcff: 1\n", "invalid UTF-8"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_config_files_name_the_file_and_the_key(tmp_path, text, message):
    if "\udcff" in text:
        path = tmp_path / "bad.yaml"
        path.write_bytes(b"\xff: 1\n")
        path = str(path)
    else:
        path = _file(tmp_path, text)
    with pytest.raises(FileFormatError) as e:
        read_config(path)
    assert str(e.value).startswith(f"lorart: {path}: ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("text, name, message", [
    ('{"r": 16, "r": 8}', "run.json", "duplicate key 'r'"),
    ('{"lr": NaN}', "run.json", "NaN is not a JSON number"),
    ('{"r": "16"}', "run.json", "key `r`: expected an integer"),
    ("r: 4", "run.txt", "expected a .yaml, .yml or .json config file"),
])
def test_bad_json_and_suffix(tmp_path, text, name, message):
    with pytest.raises(FileFormatError, match=".*" + message.replace("(", r"\(").replace(")", r"\)")):
        read_config(_file(tmp_path, text, name))


def test_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="no such config file"):
        read_config(str(tmp_path / "nope.yaml"))


def test_method_options_checked_against_the_runs_method(tmp_path):
    path = _file(tmp_path, "method: adapter\nmethod_options: {bottlenek: 8}\n")
    with pytest.raises(FileFormatError, match=f"{path}: key `method_options.bottlenek`: not an option of method "
                                              "'adapter'"):
        merge_config(read_config(path), {}, path)
    path = _file(tmp_path, "method: adapter\nmethod_options: {bottleneck: '8'}\n", "b.yaml")
    with pytest.raises(FileFormatError, match="key `method_options.bottleneck`: expected an integer"):
        merge_config(read_config(path), {}, path)
    # the command line's method decides which options are valid; its own options win key by key
    path = _file(tmp_path, "method: adapter\nmethod_options: {bottleneck: 8, scale: 0.01}\n", "c.yaml")
    merged = merge_config(read_config(path), {"method_options": {"bottleneck": 16}}, path)
    assert merged["method_options"] == {"bottleneck": 16, "scale": 0.01}


def test_dump_config_quotes_what_would_read_back_as_another_type(tmp_path):
    cfg = {"model": "1e5", "data": "true", "output_dir": "010", "format_regex": "null", "lr": 1e-05, "r": 16,
           "targets": ["q_proj"], "method_options": {"init_text": "yes"}}
    path = _file(tmp_path, dump_config(cfg, "a header\nof two lines"))
    text = open(path).read()
    assert text.startswith("# a header\n# of two lines\n")
    assert read_config(path) == cfg


# -- the command line --------------------------------------------------------------------------------------------
def _cli(argv, capsys, monkeypatch, capture=True):
    """Run `lorart ARGV` in-process; with `capture`, lorart.train is replaced by a recorder of its arguments."""
    from lorart.__main__ import main
    calls = []
    if capture:
        monkeypatch.setattr(lorart.training, "train", lambda *a, **k: calls.append((a, k)))
    monkeypatch.delenv("LORART_DEBUG", raising=False)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err, calls


def test_command_line_overrides_the_file(tmp_path, capsys, monkeypatch):
    path = _file(tmp_path, "model: m\ndata: d.jsonl\noutput_dir: out\nr: 4\nrslora: true\nlr: 1e-3\n"
                           "general_data: false\nmethod: adapter\nmethod_options: {bottleneck: 8}\nreport_to: [none]\n")
    rc, err, calls = _cli(["train", "--config", path, "--r", "8", "--no-rslora", "--output-dir", "o2",
                           "--method-option", "scale=0.5"], capsys, monkeypatch)
    assert rc == 0, err
    (args, kw), = calls
    assert args == ("m", "d.jsonl") and kw["output_dir"] == "o2" and kw["general_data"] is False
    assert kw["r"] == 8 and kw["rslora"] is False and kw["lr"] == 1e-3 and kw["method"] == "adapter"
    assert kw["method_options"] == {"bottleneck": 8, "scale": 0.5} and kw["device"] == "auto"
    assert "max_steps" not in kw   # not the quick run: the file names a model


def test_quick_run_defaults_apply_under_the_file(tmp_path, capsys, monkeypatch):
    from lorart.cli import QUICK_DEFAULTS
    path = _file(tmp_path, "max_steps: 5\n")
    rc, err, calls = _cli(["train", "--config", path], capsys, monkeypatch)
    assert rc == 0, err
    kw = calls[0][1]
    assert kw["max_steps"] == 5 and kw["batch_size"] == QUICK_DEFAULTS["batch_size"]


@pytest.mark.parametrize("text, message", [("bogus: 1\n", "unknown key `bogus`"), ("r: 1.5\n", "key `r`"),
                                           ("lr: [\n", "not valid YAML")])
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, text, message):
    path = _file(tmp_path, text)
    rc, err, calls = _cli(["train", "--config", path], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"lorart: error: {path}: ") and message in lines[0], err
    assert not calls


@pytest.mark.parametrize("argv, message", [
    (["--r", "0"], "train: argument --r: expected an int >= 1, got 0"),
    (["--dropout", "1"], "train: argument --dropout: expected a number in [0, 1), got 1.0"),
    (["--report-to", "tensorboard,neptune"], "train: argument --report-to: expected 'none' or some of"),
    (["--warmup", "abc"], "train: argument --warmup: expected a step count or a fraction of the steps, got 'abc'"),
    (["--dtype", "float16", "--method", "bitfit"], "train: argument --dtype: float16 trains with loss scaling"),
])
def test_option_errors_name_the_flag_or_the_key(tmp_path, capsys, monkeypatch, argv, message):
    # a bad value is named as the user wrote it: the flag on the command line, the key in the config file
    monkeypatch.chdir(tmp_path)
    rc, err, _ = _cli(["train", "--model", tmp_path / "none", *argv], capsys, monkeypatch, capture=False)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lorart: error: " + message), err
    path = _file(tmp_path, "dtype: float16\n")
    rc, err, _ = _cli(["train", "--config", path, "--method", "bitfit", "--model", tmp_path / "none"], capsys,
                      monkeypatch, capture=False)
    assert rc == 2 and err.startswith(f"lorart: error: {path}: key `dtype`: float16 trains"), err
    assert not (tmp_path / "lorart-output").exists()


def test_a_run_repeats_from_its_config_yaml(tmp_path, capsys, monkeypatch):
    model = tiny_folder(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                     {"role": "assistant", "content": f"answer {i % 3}"}]}) + "\n"
                            for i in range(16)))
    first = _file(tmp_path, f"model: {model}\ndata: {data}\nmax_steps: 3\nbatch_size: 4\nmax_seq_len: 48\nr: 4\n"
                            "dropout: 0.1\nnum_samples: 1\nsample_max_new_tokens: 2\ngeneral_data: false\n"
                            "targets: all-linear\nlr: 3e-3\n")
    rc, err, _ = _cli(["train", "--config", first, "--output-dir", tmp_path / "a", "--quiet"], capsys, monkeypatch,
                      capture=False)
    assert rc == 0, err
    written = tmp_path / "a" / "config.yaml"
    text = written.read_text()
    assert text.startswith("# lorart train configuration, resolved (device auto -> ")
    cfg = read_config(str(written))
    assert cfg["model"] == model and cfg["data"] == str(data) and cfg["max_steps"] == 3 and cfg["lr"] == 3e-3
    assert cfg["targets"] == "all-linear" and cfg["output_dir"] == str(tmp_path / "a") and cfg["epochs"] == 1
    from lorart.training.options import option_names
    assert set(option_names()) <= set(cfg)   # every option, resolved
    rc, err, _ = _cli(["train", "--config", written, "--output-dir", tmp_path / "b", "--quiet"], capsys, monkeypatch,
                      capture=False)
    assert rc == 0, err

    def metrics(d):
        recs = [json.loads(ln) for ln in open(tmp_path / d / "metrics.jsonl")]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in recs]
    assert metrics("a") == metrics("b") and len(metrics("a")) >= 3
    sa, sb = (json.load(open(tmp_path / d / "summary.json")) for d in "ab")
    assert sa["after"] == sb["after"] and sa["options"] == sb["options"]
    assert {k: v for k, v in read_config(str(tmp_path / "b" / "config.yaml")).items() if k != "output_dir"} == \
        {k: v for k, v in cfg.items() if k != "output_dir"}
    # a third run into the first folder needs --overwrite, and config.yaml is part of what it replaces
    rc, err, _ = _cli(["train", "--config", written], capsys, monkeypatch, capture=False)
    assert rc == 2 and "holds a previous run" in err and "config.yaml" in err
    # resuming with a changed option that shapes the run is refused, naming it; config.yaml is left as it was
    before = written.read_text()
    rc, err, _ = _cli(["train", "--config", written, "--resume", "--lr", "1e-2", "--quiet"], capsys, monkeypatch,
                      capture=False)
    assert rc == 2 and "belongs to another run: training options differ (lr: checkpoint 0.003 vs now 0.01)" in err
    assert written.read_text() == before
    # the written file resumes its own run (same fingerprint: unresolved dtype/device are written as given)
    rc, err, _ = _cli(["train", "--config", written, "--resume", "--quiet"], capsys, monkeypatch, capture=False)
    assert rc == 0, err


def test_in_memory_inputs_are_marked_not_silently_dropped(tmp_path):
    import torch

    from lorart.training import TrainOptions
    from lorart.training.config import resolved_config
    cfg = resolved_config(TrainOptions(targets="all-linear").validate(), model=torch.nn.Linear(1, 1),
                          data=[{"text": "a"}], eval_data=None, general_data=True, output_dir=tmp_path, device="cpu")
    assert cfg["model"] == "<in-memory Linear: pass it again; not repeatable from this file>"
    assert cfg["data"].startswith("<in-memory list") and cfg["general_data"] is True and cfg["eval_data"] is None
    assert cfg["report_to"] == [] and cfg["targets"] == "all-linear" and "extra" not in cfg
    path = _file(tmp_path, dump_config(cfg))
    assert read_config(path)["model"] == cfg["model"]   # reads back; loading it fails naming it


def test_a_config_yaml_lorart_did_not_write_is_never_overwritten(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("# my own notes\nr: 8\n")
    rc, err, calls = _cli(["train", "--config", out / "config.yaml", "--output-dir", out, "--overwrite",
                           "--model", "/nonexistent"], capsys, monkeypatch, capture=False)
    assert rc == 2 and f"{out / 'config.yaml'} was not written by lorart" in err, err
    assert (out / "config.yaml").read_text() == "# my own notes\nr: 8\n"
