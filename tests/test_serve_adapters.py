"""`lorart serve` and the adapter folders users bring: lying, corrupt and non-finite folders are refused by the strict
loaders (400 on /v1/load_lora_adapter, one `lorart: error:` line at startup; the served set and the answers stay
as they were), and what `lorart train` writes (the final adapter/ and a checkpoint's adapter/) and what PEFT itself
writes are served with `lorart generate`'s greedy tokens."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, os.path.dirname(__file__))
from serve_helpers import make_engine, Paused, reference_text, Server, wait_until  # noqa: E402
from serve_helpers import one_thread, tiny  # noqa: E402,F401 - fixtures: one intra-op thread (autouse);
#   the tiny model and its two adapters (once per module)

import lorart  # noqa: E402
from lorart.models import generate, load_model  # noqa: E402

PYDIR = os.path.dirname(os.path.dirname(lorart.__file__))


def _tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _save(folder, tensors):
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))


def _edit_config(folder, **kw):
    p = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    open(p, "w").write(json.dumps(cfg))


def _nan(d):
    t = _tensors(d)
    k = sorted(t)[1]
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")
    _save(d, t)


def _f64(d):
    _save(d, {k: v.double() for k, v in _tensors(d).items()})


def _int(d):
    _save(d, {k: (v * 100).to(torch.int32) for k, v in _tensors(d).items()})


def _inf_bf16(d):
    t = {k: v.bfloat16() for k, v in _tensors(d).items()}
    k = sorted(t)[0]
    t[k][0, 0] = float("inf")
    _save(d, t)


def _truncated(d):
    p = os.path.join(d, "adapter_model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def _pickle_only(d):
    os.replace(os.path.join(d, "adapter_model.safetensors"), os.path.join(d, "adapter_model.bin"))


def _wrong_module(d):
    t = _tensors(d)
    _save(d, {k.replace("layers.0.", "layers.7."): v for k, v in t.items()})


def _wrong_shape(d):
    t = _tensors(d)
    k = next(k for k in sorted(t) if k.endswith("lora_A.weight"))
    t[k] = torch.randn(t[k].shape[0], t[k].shape[1] + 1)
    _save(d, t)


def _method_disagrees(d):
    p = os.path.join(d, "lorart_method.json")
    meta = {"format_version": 1, "method": "lora", "config": {"r": 8, "alpha": 8.0}}
    if os.path.exists(p):
        meta = json.load(open(p))
        meta["config"]["r"] = 8
    open(p, "w").write(json.dumps(meta))


def _other_base(d):
    meta = {"format_version": 1, "method": "lora", "config": {"r": 4, "alpha": 8.0},
            "base_model": {"num_hidden_layers": 3, "hidden_size": 64}}
    open(os.path.join(d, "lorart_method.json"), "w").write(json.dumps(meta))


BAD_FOLDERS = [
    (_nan, "not finite"),
    (_inf_bf16, "not finite"),
    (_f64, "expected dtype"),
    (_int, "expected dtype"),
    (_truncated, "not a readable safetensors file"),
    (_pickle_only, "a pickle, which lorart never loads"),
    (lambda d: _edit_config(d, r=8), "rank 4 disagrees with the config's r"),
    (lambda d: _edit_config(d, r="4"), "key `r`: expected"),
    (lambda d: _edit_config(d, lora_alpha=None), "key `lora_alpha`"),
    (lambda d: _edit_config(d, use_dora=True), "DoRA adapters are not supported"),
    (lambda d: _edit_config(d, target_modules=["q_proj"]), "does not list modules"),
    (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write('{"r": 4, "lora_alpha": NaN}'),
     "not valid JSON"),
    (lambda d: os.remove(os.path.join(d, "adapter_config.json")), "adapter_config.json: missing"),
    (_wrong_module, "does not exist"),
    (_wrong_shape, "expected shape"),
    (_method_disagrees, "disagree"),
    (_other_base, "trained on a model with num_hidden_layers=3, this model has 2"),
]


def test_load_refuses_bad_adapter_folders_and_serving_goes_on(tiny, tmp_path):
    """Every bad folder: HTTP 400 naming the file and the fault, nothing registered, in-flight answers unchanged."""
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, {"alpha": ads["alpha"]})
    want = reference_text(model_dir, ads["alpha"], tok.encode("keep going"), 6)
    long_want = reference_text(model_dir, ads["alpha"], tok.encode("in flight"), 300)
    slow = eng.model.model.layers[0].register_forward_pre_hook(lambda *a: time.sleep(0.01))  # >= 3 s of steps
    with Server(eng, allow_adapter_loading=True) as srv:
        c = srv.client()
        stream = iter(c.completions.create(model="alpha", prompt="in flight", max_tokens=300, temperature=0,
                                           stream=True))
        streamed = [next(stream).choices[0].text]   # running while the folders below are tried (and one loaded)
        for i, (spoil, words) in enumerate(BAD_FOLDERS):
            d = str(tmp_path / f"bad{i}")
            shutil.copytree(ads["beta"], d)
            spoil(d)
            r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": f"bad{i}", "lora_path": d},
                           timeout=60)
            assert r.status_code == 400, (i, words, r.text)
            err = r.json()["error"]
            assert words in err["message"] and err["param"] == "lora_path", (i, words, err)
            assert d in err["message"], err  # names the folder or its file
            with pytest.raises(openai.NotFoundError):
                c.completions.create(model=f"bad{i}", prompt="x", max_tokens=1)
        assert [m.id for m in c.models.list().data] == ["tiny", "alpha"]
        got = c.completions.create(model="alpha", prompt="keep going", max_tokens=6, temperature=0).choices[0].text
        assert got == want
        # a good folder loads after all that
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": ads["beta"]},
                       timeout=60)
        assert r.status_code == 200, r.text
        got = c.completions.create(model="beta", prompt="keep going", max_tokens=6, temperature=0).choices[0].text
        assert got == reference_text(model_dir, ads["beta"], tok.encode("keep going"), 6)
        assert eng.load_info()["running"] == 1   # the stream was running during all the loads
        slow.remove()
        streamed += [ch.choices[0].text for ch in stream]
        assert "".join(streamed) == long_want


def test_a_folder_changed_on_disk_is_not_served_under_the_old_name(tiny, tmp_path):
    """alpha is evicted (LRU bound 1), then its folder is overwritten with other valid weights: the next request for
    alpha is refused (it would silently serve other weights), until alpha is unloaded and loaded again."""
    model_dir, ads = tiny
    moved = str(tmp_path / "alpha")
    shutil.copytree(ads["alpha"], moved)
    eng, tok = make_engine(model_dir, {"alpha": moved, "beta": ads["beta"]}, max_adapters=1)
    ids = tok.encode("same name")
    before = reference_text(model_dir, ads["alpha"], ids, 6)
    with Server(eng, allow_adapter_loading=True) as srv:
        c = srv.client()
        ask = lambda m: c.completions.create(model=m, prompt="same name", max_tokens=6, temperature=0).choices[0].text
        assert ask("alpha") == before
        ask("beta")   # alpha evicted
        new = str(tmp_path / "alpha2")
        shutil.copytree(moved, new)
        _save(new, {k: v * 3 for k, v in _tensors(moved).items()})
        shutil.rmtree(moved)
        os.replace(new, moved)   # replaced whole, as `lorart train --overwrite` does
        with pytest.raises(openai.InternalServerError, match="changed on disk since it was loaded as 'alpha'"):
            ask("alpha")
        assert httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 200
        assert httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": moved},
                          timeout=60).status_code == 200
        after = ask("alpha")
        assert after == reference_text(model_dir, moved, ids, 6) and after != before


def test_a_request_waiting_for_an_adapter_slot_is_not_overtaken(tiny):
    """One adapter slot (--max-adapters 1): alpha runs, beta waits for the slot; a later alpha request must not
    join alpha's batch ahead of beta (a steady flow of alpha requests would keep alpha pinned and starve beta).
    Base requests, which need no slot, still pass."""
    from lorart.serving.text import SamplingParams
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, ads, max_adapters=1)
    done, lock = [], threading.Lock()

    def sink(tag):
        def f(kind, data):
            if kind != "delta":
                with lock:
                    done.append((tag, kind, data))
        return f
    eng.start()
    try:
        with Paused(eng):
            for tag, model in (("alpha1", "alpha"), ("beta", "beta"), ("alpha2", "alpha"), ("base", None)):
                eng.submit([tok.encode(f"{tag} goes")], SamplingParams(max_tokens=12), model, [sink(tag)])
            wait_until(lambda: eng.load_info()["waiting"] == 4)
        wait_until(lambda: len(done) == 4, 120)
    finally:
        eng.close()
    order = [t for t, _, _ in done]
    assert all(k == "done" for _, k, _ in done), done
    assert order.index("beta") < order.index("alpha2"), order
    assert order.index("base") < order.index("beta"), order   # ran beside alpha1
    for tag, _, data in done:
        ad = {"alpha1": ads["alpha"], "alpha2": ads["alpha"], "beta": ads["beta"]}.get(tag)
        assert data["text"] == reference_text(model_dir, ad, tok.encode(f"{tag} goes"), 12), tag


def _serve_cli(*args):
    env = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "lorart", "serve", "--threads", "1", "--port", "0", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_startup_refuses_a_nan_adapter_in_one_line(tiny, tmp_path):
    model_dir, ads = tiny
    d = str(tmp_path / "nan")
    shutil.copytree(ads["alpha"], d)
    _nan(d)
    p = _serve_cli("--model", model_dir, "--adapter", f"ok={ads['beta']}", "--adapter", f"bad={d}")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith(f"lorart: error: argument --adapter bad={d}: ") and "not finite" in lines[0], lines


# -- what lorart train and PEFT write ----------------------------------------------------------------------------
def _generate_reference(model_dir, adapter, ids, n):
    """`lorart generate --model model_dir --adapter adapter` (greedy): lorart.methods.load, then generate."""
    m, tok = load_model(model_dir)
    lorart.methods.load(m, adapter)
    out = generate(m.eval(), [ids], max_new_tokens=n, eos_token_id=tok.eos_ids or None, pad_token_id=tok.pad_id)
    new = out[0, len(ids):].tolist()
    eos = set(tok.eos_ids or [])
    new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
    return tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    model_dir, _ = tiny
    d = tmp_path_factory.mktemp("trained")
    p = lorart.data.default_dataset_paths()
    (d / "data.jsonl").write_text("\n".join(open(p["train"], encoding="utf-8").read().splitlines()[:16]) + "\n")
    out = str(d / "run")
    lorart.train(model_dir, str(d / "data.jsonl"), eval_data=str(d / "data.jsonl"), output_dir=out, max_steps=2,
                 batch_size=4, max_seq_len=48, lr=5e-2, warmup=0, r=4, alpha=8, save_every=1, eval_every=2,
                 num_samples=0, general_data=False, progress=False, targets=["q_proj", "v_proj", "o_proj"])
    return {"final": os.path.join(out, "adapter"),
            "ckpt": os.path.join(out, "checkpoints", "step-0000001", "adapter"), "run": out}


def _peft_folder(model_dir, out):
    """An adapter written by PEFT itself (save_pretrained) on transformers' Llama of the same folder."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").float()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "down_proj"],
                                                 lora_dropout=0.0))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return out


def test_serves_what_lorart_train_and_peft_write(tiny, trained, tmp_path):
    model_dir, _ = tiny
    folders = {"final": trained["final"], "ckpt": trained["ckpt"], "peft": _peft_folder(model_dir, str(tmp_path / "p"))}
    eng, tok = make_engine(model_dir, folders)
    prompts = ["What is the capital of France?", "Hello there"]
    seen = {}
    with Server(eng) as srv:
        c = srv.client()
        for name, path in folders.items():
            for p in prompts:
                ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True)
                got = c.chat.completions.create(model=name, messages=[{"role": "user", "content": p}],
                                                max_tokens=8, temperature=0).choices[0].message.content
                assert got == _generate_reference(model_dir, path, ids, 8), (name, p)
                seen.setdefault(p, set()).add(got)
    assert _tensors(trained["final"]).keys() == _tensors(trained["ckpt"]).keys()
    for wrong, inner in ((trained["run"], trained["final"]), (os.path.dirname(trained["ckpt"]), trained["ckpt"])):
        with pytest.raises(lorart.adapters.AdapterFileError, match=f"output folder, not an adapter folder: its "
                                                                   f"adapter is {inner}"):
            eng.registry.add("wrong", wrong)
    assert any(len(v) > 1 for v in seen.values())   # the adapters change the answers
