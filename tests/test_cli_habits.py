"""CLI habits: `lorart --version`, help text with its default for every flag of every subcommand, and a missing
optional package is one line naming `pip install "lorart[extra]"` (exit 2) wherever the CLI meets it."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

import lorart

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

PYDIR = os.path.dirname(os.path.dirname(lorart.__file__))

# runs `lorart ARGV` with the top-level modules in BLOCK missing: `import m` raises ModuleNotFoundError(name=m) and
# importlib.util.find_spec(m) is None, as when their package is not installed
BLOCKED_MAIN = """
import sys
for m in sys.argv[1].split(","):
    sys.modules[m] = None
from lorart.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def blocked(modules, *argv, cwd=None, env=None):
    e = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    e.pop("LORART_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", BLOCKED_MAIN, ",".join(modules), *map(str, argv)],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=e)


def _one_line(p, code=2):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and lines[0].startswith("lorart: error: "), (p.returncode,
                                                                                                 p.stderr)
    return lines[0]


def test_version(capsys):
    from lorart.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lorart {lorart.__version__}\n"


def _parsers(p: argparse.ArgumentParser, path=("lorart",)):
    yield " ".join(path), p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_flag_of_every_subcommand_has_help_with_its_default():
    from lorart.__main__ import build_parser
    seen, missing = 0, []
    for where, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            seen += 1
            name = f"{where} {'/'.join(a.option_strings) or a.dest}"
            if not a.help or a.help == argparse.SUPPRESS:
                missing.append(f"{name}: no help")
            elif a.option_strings and a.nargs != 0 and not a.required and "default" not in a.help:
                missing.append(f"{name}: the help does not say the default")
        p.format_help()   # every help string formats (no stray %)
    assert seen > 80 and not missing, missing


def test_train_help_shows_the_option_defaults(capsys):
    from lorart.__main__ import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--r N, --lora-r N LoRA rank", "(default 16)", "peak learning rate (default 0.0002; 0.001 in the quick run)",
                 "--report-to TRACKERS", "--config FILE", "where the adapter and reports go (default lorart-",
                 "--no-packing"):
        assert text in out, text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("habits") / "model")


def test_train_without_the_models_extra_is_one_line(model, tmp_path):
    # before: `import lorart` itself failed with a 30-line traceback (tokenizers imported at module level)
    p = blocked(["tokenizers"], "train", "--model", model, "--max-steps", "1", "--output-dir", tmp_path / "o",
                env={"LORART_CACHE": str(tmp_path / "cache")})
    assert _one_line(p) == ('lorart: error: reading tokenizer.json needs the `tokenizers` package, which is not '
                            'installed: pip install "lorart[models]"')
    p = blocked(["gguf"], "generate", "--model", tmp_path / "m.gguf", "hi", env={"LORART_CACHE": str(tmp_path)})
    assert "no such model folder or file" in _one_line(p)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    p = blocked(["gguf"], "generate", "--model", tmp_path / "m.gguf", "hi", env={"LORART_CACHE": str(tmp_path)})
    assert _one_line(p).endswith('reading a GGUF file needs the `gguf` package, which is not installed: pip install '
                                 '"lorart[models]"')


def test_version_and_info_work_without_the_extras(tmp_path):
    p = blocked(["tokenizers", "gguf", "jinja2", "yaml", "tqdm", "matplotlib"], "--version")
    assert p.returncode == 0 and p.stdout == f"lorart {lorart.__version__}\n", p.stderr
    p = blocked(["tokenizers", "yaml"], "info")
    assert p.returncode == 0, p.stderr
    assert 'extra [models]: missing tokenizers, pyyaml (pip install "lorart[models]")' in p.stdout


def test_a_yaml_config_without_pyyaml_is_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 1\n")
    p = blocked(["yaml"], "train", "--config", cfg)
    assert _one_line(p) == ('lorart: error: a YAML config file needs the `pyyaml` package, which is not installed: '
                            'pip install "lorart[models]"')


def test_any_missing_module_of_an_extra_names_the_extra():
    from lorart.cli import describe_error
    assert describe_error(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib.pyplot"), "train") == (
        'lorart train needs the `matplotlib` package, which is not installed: pip install "lorart[models]"', 2)
    assert describe_error(ModuleNotFoundError("x", name="pyarrow"), "eval")[0].endswith('pip install "lorart[data]"')
    assert describe_error(ModuleNotFoundError("x", name="peft"), "eval") == (
        "lorart eval needs the `peft` package, which is not installed: pip install peft", 2)
    assert describe_error(ModuleNotFoundError("x", name="somethingelse"), "eval") == (
        "lorart eval needs the Python module `somethingelse`, which is not installed", 2)
    msg, code = describe_error(ModuleNotFoundError("x", name="lorart.nothing"), "eval")   # our own: a bug
    assert code == 1 and msg.startswith("internal error")


def test_a_missing_package_never_deletes_the_gguf_cache(tmp_path, monkeypatch):
    from lorart.errors import MissingExtraError
    from lorart.models import hub
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("LORART_CACHE", str(tmp_path / "cache"))
    folder = hub._gguf_cache_folder(str(gguf), lorart.models.loading.as_dtype("float32"), hub.cache_dir())
    os.makedirs(folder)
    open(os.path.join(folder, "config.json"), "w").write("{}")

    def missing(*a, **k):
        raise MissingExtraError('lorart: reading tokenizer.json needs the `tokenizers` package, which is not '
                                'installed: pip install "lorart[models]"')
    monkeypatch.setattr(hub, "load_hf_folder", missing)
    with pytest.raises(MissingExtraError):
        hub.load_model(str(gguf))
    assert os.path.isfile(os.path.join(folder, "config.json"))   # was: "broken cache", removed and converted again
