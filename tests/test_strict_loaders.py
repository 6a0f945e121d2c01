"""One set of adapter folders, accepted or refused the same way by every entry point: lorart.load_adapter,
lorart.methods.load, `lorart generate/eval/chat --adapter` and the C++ AdapterStore (through the example
service's `load` command). Bad folders are mutations of a good lorart LoRA folder (lorart_method.json +
PEFT's adapter_config.json + adapter_model.safetensors): lying types, non-finite numbers, bad tensors,
unknown format versions, files that disagree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorart
import lorart.methods as M
from lorart.errors import InputError

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

CFG, ST, META = "adapter_config.json", "adapter_model.safetensors", "lorart_method.json"
KA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KB = KA.replace("lora_A", "lora_B")
MODULE = "model.layers.0.self_attn.v_proj"


def _json_edit(name, **changes):
    def f(d):
        p = os.path.join(d, name)
        obj = json.load(open(p))
        for k, v in changes.items():
            if v is _DROP:
                obj.pop(k, None)
            else:
                obj[k] = v
        json.dump(obj, open(p, "w"))
    return f


def _raw_cfg(key, raw, name=CFG):
    """Replace the value of `key` by raw JSON text (for NaN, 1e309, duplicate keys, ...)."""
    def f(d):
        p = os.path.join(d, name)
        obj = json.load(open(p))
        obj[key] = "@@"
        open(p, "w").write(json.dumps(obj).replace('"@@"', raw))
    return f


def _meta_config(**changes):
    def f(d):
        p = os.path.join(d, META)
        obj = json.load(open(p))
        obj["config"].update(changes)
        json.dump(obj, open(p, "w"))
    return f


def _tensors(fn):
    def f(d):
        p = os.path.join(d, ST)
        sd = load_file(p)
        fn(sd)
        save_file(sd, p)
    return f


def _set(key, value):
    def fn(sd):
        sd[key] = value(sd[key]) if callable(value) else value
    return fn


def _nested(n):
    return "[" * n + "]" * n


_DROP = object()
cfg = lambda **kw: _json_edit(CFG, **kw)  # noqa: E731
meta = lambda **kw: _json_edit(META, **kw)  # noqa: E731

BAD = {
    "use_rslora as a string": cfg(use_rslora="false"),
    "r as a string": cfg(r="4"),
    "r fractional": cfg(r=4.5),
    "r as 4.0": _raw_cfg("r", "4.0"),
    "r as true": cfg(r=True),
    "r zero": cfg(r=0),
    "r beyond int64": _raw_cfg("r", "99999999999999999999"),
    "lora_alpha NaN": _raw_cfg("lora_alpha", "NaN"),
    "lora_alpha Infinity": _raw_cfg("lora_alpha", "Infinity"),
    "lora_alpha 1e309": _raw_cfg("lora_alpha", "1e309"),
    "lora_alpha as a string": cfg(lora_alpha="32"),
    "lora_alpha missing": cfg(lora_alpha=_DROP),
    "lora_dropout 2": cfg(lora_dropout=2),
    "use_dora as a string": cfg(use_dora="true"),
    "lora_bias": cfg(lora_bias=True),
    "modules_to_save": cfg(modules_to_save=["lm_head"]),
    "bias all": cfg(bias="all"),
    "peft_type IA3": cfg(peft_type="IA3"),
    "rank_pattern a list": cfg(rank_pattern=["q_proj"]),
    "rank_pattern value a string": cfg(rank_pattern={"q_proj": "4"}),
    "rank_pattern bad regex": cfg(rank_pattern={"q_proj(": 4}),
    "rank_pattern disagrees with the tensors": cfg(rank_pattern={"q_proj": 2}),
    "target_modules misses modules": cfg(target_modules=["q_proj"]),
    "target_modules a number": cfg(target_modules=5),
    "duplicate key": _raw_cfg("peft_type", '"LORA", "r": 4'),
    "100k-deep JSON": lambda d: open(os.path.join(d, CFG), "w").write(_nested(100000)),
    "65 levels deep": cfg(extra=json.loads(_nested(64))),
    "lone surrogate": _raw_cfg("base_model_name_or_path", '"\\ud800"'),
    "not an object": lambda d: open(os.path.join(d, CFG), "w").write("[1]"),
    "weights NaN": _tensors(_set(KB, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))),
    "weights inf": _tensors(_set(KA, lambda t: t.index_fill(1, torch.tensor([3]), float("inf")))),
    "weights int32": _tensors(_set(KA, lambda t: t.to(torch.int32))),
    "weights float64": _tensors(_set(KA, lambda t: t.double())),
    "lora_B missing": _tensors(lambda sd: sd.pop(KB)),
    "extra tensor": _tensors(_set("base_model.model.lm_head.weight", torch.zeros(4, 4))),
    "adapter name in key": _tensors(lambda sd: sd.update({KA.replace(".weight", ".default.weight"): sd.pop(KA)})),
    "rank disagrees with r": cfg(r=8),
    "truncated safetensors": lambda d: open(os.path.join(d, ST), "r+b").truncate(os.path.getsize(os.path.join(d, ST)) // 2),
    "format_version 99": meta(format_version=99),
    "format_version 1.0": _raw_cfg("format_version", "1.0", name=META),
    "format_version a string": meta(format_version="1"),
    "format_version missing": meta(format_version=_DROP),
    "meta alpha disagrees": _meta_config(alpha=64.0),
    "meta r a string": _meta_config(r="4"),
    "meta rslora disagrees": _meta_config(rslora=True),
    "meta targets a number": _meta_config(targets=5),
    "meta unknown option": _meta_config(bottleneck=3),
    "meta NaN": _raw_cfg("config", '{"alpha": NaN}', name=META),
    "meta of another method": meta(method="adapter"),
    "meta base_model a string": meta(base_model={"hidden_size": "64"}),
}

GOOD = {
    "as written": lambda d: None,
    "PEFT only (no lorart_method.json)": lambda d: os.remove(os.path.join(d, META)),
    "bfloat16 weights": _tensors(lambda sd: sd.update({k: v.bfloat16() for k, v in sd.items()})),
    "nulls for optional keys": cfg(use_rslora=None, lora_dropout=None, rank_pattern=None, bias=None),
    "alpha_pattern on v_proj": cfg(alpha_pattern={"v_proj": 8}),
    "64 levels deep": cfg(extra=json.loads(_nested(63))),
    "target_modules as a regex": cfg(target_modules=".*(q|k|v|o)_proj"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    model_dir = tiny_folder(root / "model")
    model, _ = lorart.models.load_model(model_dir)
    meth = M.prepare(model, "lora", r=4, alpha=32.0, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in meth.named_trainable_parameters().items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    good = meth.save(str(root / "good"))
    out = {}
    for kind, table in (("bad", BAD), ("good", GOOD)):
        for name, mutate in table.items():
            d = root / kind / name.replace(" ", "_")
            shutil.copytree(good, d)
            mutate(str(d))
            out[name] = str(d)
    data = root / "eval.jsonl"
    data.write_text('{"text": "The capital of France is Paris."}\n{"text": "Two and two make four."}\n')
    return {"model": model_dir, "root": root, "dirs": out, "data": str(data)}


def _fresh(folders):
    return lorart.models.load_model(folders["model"])[0]


ALL = [(n, False) for n in BAD] + [(n, True) for n in GOOD]


@pytest.mark.parametrize("name, ok", ALL)
def test_python_api_and_methods_agree(folders, name, ok):
    d = folders["dirs"][name]
    for load in (lambda m: lorart.load_adapter(m, d), lambda m: M.load(m, d)):
        if ok:
            load(_fresh(folders))
        else:
            with pytest.raises(InputError) as e:
                load(_fresh(folders))
            assert d in str(e.value), str(e.value)   # the message names the file


@pytest.mark.parametrize("name, ok", ALL)
def test_cli_commands_agree(folders, name, ok, capsys, monkeypatch):
    from lorart.__main__ import main

    monkeypatch.delenv("LORART_DEBUG", raising=False)
    d = folders["dirs"][name]
    model = folders["model"]
    for argv in (["generate", "--model", model, "--adapter", d, "--max-new-tokens", "1", "hi"],
                 ["eval", "--model", model, "--adapter", d, "--num-samples", "0", "--data", folders["data"]]):
        rc = main(argv)
        err = capsys.readouterr().err
        if ok:
            assert rc == 0, err
        else:
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("lorart: error: "), (argv[0], err)
            assert "internal error" not in err


def test_chat_refuses_like_generate(folders):
    """`lorart chat` (a real process) goes through the same loader."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(lorart.__file__)), PYTHONWARNINGS="ignore")
    env.pop("LORART_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "lorart", "chat", "--model", folders["model"], "--adapter",
                        folders["dirs"]["use_rslora as a string"]], input="hi\n", capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "key `use_rslora`: expected true or false" in p.stderr


@pytest.fixture(scope="module")
def service(folders, tmp_path_factory):
    from cpp_build import build_example

    bins = build_example(tmp_path_factory.mktemp("cpp"))
    model, _ = lorart.models.load_model(folders["model"])
    base = folders["root"] / "base.safetensors"
    save_file({f"{MODULE}.weight": model.get_submodule(MODULE).weight.detach().contiguous()}, str(base))
    return bins["service"], base


def _serve(service, requests, base=None):
    exe, base = service[0], base or service[1]
    inp = "".join(json.dumps(r) + "\n" for r in requests)
    p = subprocess.run([str(exe), "--base", str(base), "--prefix", MODULE], input=inp, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]   # every line is strict JSON


def test_cpp_store_agrees(folders, service):
    names = [n for n, _ in ALL]
    out = _serve(service, [{"cmd": "load", "adapter": f"a{i}", "path": folders["dirs"][n]} for i, n in enumerate(names)])
    wrong = []
    for (name, ok), o in zip(ALL, out):
        if ok != ("loaded" in o):
            wrong.append((name, o))
    assert not wrong, wrong


def test_cpp_store_applies_alpha_pattern_as_python_does(folders, service):
    """The per-module alpha (PEFT's alpha_pattern) gives the same output in C++ and in Python."""
    d = folders["dirs"]["alpha_pattern on v_proj"]
    model = _fresh(folders)
    lorart.load_adapter(model, d)
    layer = model.get_submodule(MODULE)
    assert layer.scaling["default"] == 8 / 4   # alpha_pattern's 8 over r 4, not lora_alpha 32 / 4
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    x = torch.tensor(x.tolist())
    with torch.no_grad():
        want = layer(x)
    out = _serve(service, [{"cmd": "load", "adapter": "p", "path": d}, {"adapter": "p", "x": x.tolist()}])
    assert out[0] == {"loaded": "p"}
    torch.testing.assert_close(torch.tensor(out[1]["y"]), want, rtol=1e-5, atol=1e-5)


def test_service_never_prints_non_json(folders, service, tmp_path):
    """Inputs outside float32 and outputs that overflow answer an error line; every line parses as JSON."""
    big = tmp_path / "big.safetensors"
    save_file({f"{MODULE}.weight": torch.full((32, 64), 3e38)}, str(big))
    out = _serve(service, [{"cmd": "load", "adapter": "g", "path": folders["dirs"]["as written"]},
                           {"adapter": "g", "x": [1e39] + [0.0] * 63}, {"adapter": None, "x": [1.0] * 64},
                           {"adapter": "g", "x": [0.0] * 64}], base=big)
    assert out[0] == {"loaded": "g"}
    assert "out of float32 range" in out[1]["error"]
    assert "not finite" in out[2]["error"]     # 64 * 3e38 overflows float32: an error, not "inf"
    assert out[3].get("y") == [0.0] * 32, out[3]


def test_writers_never_write_what_the_loaders_refuse(folders, tmp_path):
    """A NaN adapter is not written (by save_adapter or a method's save); nothing is left behind."""
    model = _fresh(folders)
    meth = M.prepare(model, "lora", r=2, dropout=0.0)
    with torch.no_grad():
        next(p for k, p in meth.named_trainable_parameters().items() if "lora_B" in k)[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite"):
        meth.save(str(tmp_path / "m"))
    with pytest.raises(InputError, match="NaN or infinite"):
        lorart.save_adapter(model, str(tmp_path / "a"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opts, message", [({"r": 16.5}, "option `r`: expected an integer"),
                                           ({"r": "16"}, "option `r`: expected an integer"),
                                           ({"rslora": "false"}, "option `rslora`: expected true or false"),
                                           ({"alpha": float("nan")}, "option `alpha`: expected a finite number")])
def test_method_options_are_typed_exactly(folders, opts, message):
    with pytest.raises(InputError, match=message):
        M.prepare(_fresh(folders), "lora", **opts)
