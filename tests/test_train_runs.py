"""Runs that never lie, tried as an adversary on a tiny random Llama: kill -9 in the middle of a checkpoint then
resume, a killed run's checkpoint adapter in PEFT, a second run into the same folder, another model or data on
resume, a corrupt newest checkpoint, stale temp files, a full disk, a busy folder, the umask, non-finite losses
and gradients (stop, or skip a bounded number), strict JSON."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import lorart
from lorart import _atomic
from lorart.training import NonFiniteError, TrainingError
from lorart.training import checkpoint as ckpt

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
PYDIR = os.path.dirname(os.path.dirname(lorart.__file__))
OPTS = dict(max_steps=4, batch_size=4, max_seq_len=48, lr=5e-3, warmup=0, dropout=0.1, r=4, alpha=8,
            eval_every=2, save_every=1, num_samples=0, general_data=False, progress=False)


def _strict(text: str):
    def no(c):
        raise AssertionError(f"bare {c} in JSON")
    return json.loads(text, parse_constant=no)


def _lines(path) -> list:
    return [_strict(x) for x in open(path, encoding="utf-8").read().splitlines()]


def _det(history):  # without wall-clock fields
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "elapsed_s")} for h in history]


def _adapter(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _same_adapter(a_dir, b_dir):
    a, b = _adapter(a_dir), _adapter(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _temps(folder) -> list:
    return [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in ds + fs if n.startswith(_atomic.TMP_PREFIXES)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    p = lorart.data.default_dataset_paths()
    recs = open(p["train"], encoding="utf-8").read().splitlines()[:24]
    (d / "data.jsonl").write_text("\n".join(recs) + "\n")
    (d / "eval.jsonl").write_text("\n".join(open(p["heldout"], encoding="utf-8").read().splitlines()[:4]) + "\n")
    env = {"dir": d, "model": tiny_folder(d / "model"), "data": str(d / "data.jsonl"), "eval": str(d / "eval.jsonl")}
    env["ref"] = lorart.train(env["model"], env["data"], eval_data=env["eval"], output_dir=d / "ref", **OPTS)
    return env


def _train(env, out, **kw):
    return lorart.train(kw.pop("model", env["model"]), kw.pop("data", env["data"]), eval_data=env["eval"],
                        output_dir=out, **{**OPTS, **kw})


def _run_py(code: str, cwd=None):
    e = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=cwd, timeout=600)


def _cli(*args, prefix=()):
    e = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    return subprocess.run([*prefix, sys.executable, "-m", "lorart", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=600)


def _one_error_line(p):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    errs = [x for x in p.stderr.splitlines() if x.startswith("lorart: error:")]
    assert len(errs) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return errs[0]


# -- kill -9, resume, PEFT ------------------------------------------------------------------------------------
KILL_IN_SECOND_CHECKPOINT = """
import os, signal, lorart
import lorart._atomic as A
import lorart.training.checkpoint as C
calls, save, write = [0], C.save_torch, A._Sink.write
def dying_write(self, b):
    n = write(self, b)
    if self.f.tell() > 512:
        os.kill(os.getpid(), signal.SIGKILL)   # mid-write of step 2's state.pt
    return n
def counting_save(obj, path):
    calls[0] += 1
    if calls[0] == 2:
        A._Sink.write = dying_write
    return save(obj, path)
C.save_torch = counting_save
lorart.train({model!r}, {data!r}, eval_data={eval!r}, output_dir={out!r}, **{opts!r})
"""


def test_kill9_mid_checkpoint_then_resume_is_exact_and_peft_loads_the_checkpoint_adapter(env, tmp_path):
    out = str(tmp_path / "run")
    p = _run_py(KILL_IN_SECOND_CHECKPOINT.format(model=env["model"], data=env["data"], eval=env["eval"], out=out,
                                                 opts=OPTS))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert _temps(os.path.join(out, "checkpoints")), "the kill should leave a half-written temp folder"
    assert ckpt.latest_checkpoint(out).endswith("step-0000001")
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(out))
    # the killed run left a usable adapter: PEFT loads it onto the same base with lorart's logits
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    adir = os.path.join(out, "checkpoints", "step-0000001", "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(env["model"], attn_implementation="eager").float().eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 7, 3]])
    with torch.no_grad():
        base_logits = hf(ids).logits
        want = peft.PeftModel.from_pretrained(hf, adir).eval()(ids).logits
    ours, _ = lorart.models.load_model(env["model"])
    lorart.methods.load(ours, adir)
    with torch.no_grad():
        got = ours.eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - base_logits).abs().max() > 1e-4   # the adapter is not a no-op
    # a plain rerun is refused; --resume cleans the temp folder and ends exactly where the uninterrupted run did
    with pytest.raises(ValueError, match="holds a previous run.*resume"):
        _train(env, out)
    res = _train(env, out, resume=True)
    assert not _temps(out)
    _same_adapter(res.adapter_dir, env["ref"].adapter_dir)
    assert _det(res.history) == _det(env["ref"].history)
    assert _det(_lines(os.path.join(out, "metrics.jsonl"))) == _det(env["ref"].history)


# -- resume identity ------------------------------------------------------------------------------------------
def test_resume_refuses_another_model_or_data_and_says_what_differs(env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(env["dir"] / "ref", out)
    other = tmp_path / "other.jsonl"
    lines = open(env["data"]).read().splitlines()
    other.write_text("\n".join(lines[1:] + lines[:1]) + "\n")   # the same records, another order
    with pytest.raises(ValueError, match=r"argument `resume`.*the training data differs.*other\.jsonl"):
        _train(env, out, data=str(other), resume=True)
    with pytest.raises(ValueError, match=r"the model's weights differ"):
        _train(env, out, model=tiny_folder(tmp_path / "model2", seed=1), resume=True)
    with pytest.raises(ValueError, match=r"training options differ \(lr: checkpoint 0.005 vs now 0.001\)"):
        _train(env, out, resume=True, lr=1e-3)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000003", "step-0000004"]   # untouched


def test_resume_skips_a_corrupt_newest_checkpoint_and_cleans_temps(env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(env["dir"] / "ref", out)
    state = out / "checkpoints" / "step-0000004" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))
    (out / ".tmp-x").write_text("junk")
    (out / "checkpoints" / ".lorart-tmp-y").mkdir()
    log = io.StringIO()
    res = _train(env, out, resume=True, progress=True, stream=log)
    assert "skipped damaged checkpoints" in log.getvalue() and "resumed from step-0000003" in log.getvalue()
    assert any("step-0000003, the newest intact one" in n for n in res.notes)
    assert not _temps(out)
    _same_adapter(res.adapter_dir, env["ref"].adapter_dir)
    assert _det(res.history) == _det(env["ref"].history)
    for c in ckpt.list_checkpoints(str(out)):      # both intact again (step 4 was rewritten)
        ckpt.verify_checkpoint(c)
    for c in ckpt.list_checkpoints(str(out)):
        (out / "checkpoints" / os.path.basename(c) / ckpt.MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="no intact checkpoint.*overwrite"):
        _train(env, out, resume=True)


# -- output folders -------------------------------------------------------------------------------------------
def test_second_run_is_refused_overwrite_replaces_and_files_follow_the_umask(env, tmp_path):
    out = tmp_path / "run"
    _train(env, out, max_steps=2)
    (out / "notes.txt").write_text("mine")
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}
    with pytest.raises(ValueError, match=r"holds a previous run \(adapter, checkpoints, metrics.jsonl, summary.json"):
        _train(env, out, max_steps=1)
    assert {f: (out / f).read_bytes() for f in before} == before
    with pytest.raises(ValueError, match="exclude each other"):
        _train(env, out, resume=True, overwrite=True)
    old = os.umask(0o027)
    try:
        res = _train(env, out, max_steps=1, overwrite=True)
    finally:
        os.umask(old)
    assert res.steps == 1 and _strict((out / "summary.json").read_text())["steps"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000001"]
    for root, dirs, files in os.walk(out):
        for n in dirs:
            assert os.stat(os.path.join(root, n)).st_mode & 0o777 == 0o750, os.path.join(root, n)
        for n in files:
            if n not in ("notes.txt", ".lorart.lock"):   # not the new run's files
                assert os.stat(os.path.join(root, n)).st_mode & 0o777 == 0o640, os.path.join(root, n)


def test_a_busy_folder_is_refused(env, tmp_path):
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lorart.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(TrainingError, match="in use by another lorart run"):
            _train(env, out)


def test_disk_full_in_a_checkpoint_is_one_error_and_nothing_is_lost(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = ckpt.save_torch

    def full(obj, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(obj, path)

    monkeypatch.setattr(ckpt, "save_torch", full)
    with pytest.raises(TrainingError, match=r"checkpoint step-0000002: cannot write .*step-0000002: no space left "
                                            r"on the device.*; newest checkpoint kept: .*step-0000001"):
        _train(env, out)
    monkeypatch.undo()
    assert not _temps(out)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000001"]
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == [1, 2, 2]   # step 2's records were logged
    res = _train(env, out, resume=True)
    _same_adapter(res.adapter_dir, env["ref"].adapter_dir)


def test_a_failed_metrics_append_never_leaves_half_a_line(tmp_path, monkeypatch):
    from lorart.training.folder import RunFolder
    f = RunFolder(tmp_path)
    f.claim()
    try:
        f.open_metrics([{"step": 1, "loss": 1.0}])
        real = os.write

        def full(fd, b):   # 7 bytes fit, then the disk is full
            real(fd, bytes(b)[:7])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(TrainingError, match="metrics.jsonl: cannot write .*metrics.jsonl: no space left"):
            f.append_metrics([{"step": 2, "loss": float("nan")}])
        monkeypatch.undo()
        assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
        f.append_metrics([{"step": 2, "loss": float("nan")}])
        assert _lines(tmp_path / "metrics.jsonl")[-1] == {"step": 2, "loss": None}
    finally:
        f.release()


# -- non-finite values ----------------------------------------------------------------------------------------
def _loaded(env):
    return lorart.models.load_model(env["model"])


def _base_weight(model):   # a frozen base weight (before or after LoRA wraps the layer)
    q = model.model.layers[0].self_attn.q_proj
    return getattr(q, "base_layer", q).weight


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(env, tmp_path):
    model, tok = _loaded(env)

    def poison(rec):
        if rec["step"] == 2:
            with torch.no_grad():
                _base_weight(model)[0, 0] = float("inf")

    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan \(not finite\).*no adapter was written.*"
                                             r"step-0000002.*skip_nonfinite"):
        _train(env, out, model=model, tokenizer=tok, callback=poison)
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    recs = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert recs[-1]["loss"] is None and recs[-1]["skipped"] is True
    last = ckpt.latest_checkpoint(str(out))
    assert last.endswith("step-0000002")
    ckpt.verify_checkpoint(last)
    assert all(bool(torch.isfinite(t).all()) for t in _adapter(os.path.join(last, "adapter")).values())


def test_skip_nonfinite_skips_a_bounded_number_of_steps(env, tmp_path):
    model, tok = _loaded(env)
    w = _base_weight(model)
    keep = float(w[0, 0])

    def transient(rec):   # step 3 sees an inf in the base, step 4 does not
        with torch.no_grad():
            w[0, 0] = float("inf") if rec["step"] == 2 else keep

    res = _train(env, tmp_path / "a", model=model, tokenizer=tok, callback=transient, skip_nonfinite=1)
    assert res.steps == 4 and res.skipped_steps == [3]
    summary = _strict((tmp_path / "a" / "summary.json").read_text())
    assert summary["skipped_steps"] == [3]
    recs = [r for r in _lines(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert recs[2]["skipped"] and recs[2]["loss"] is None and not any(r.get("skipped") for r in recs[:2] + recs[3:])
    assert all(bool(torch.isfinite(t).all()) for t in _adapter(res.adapter_dir).values())

    model, tok = _loaded(env)

    def stays(rec):
        if rec["step"] == 2:
            with torch.no_grad():
                _base_weight(model)[0, 0] = float("nan")

    with pytest.raises(NonFiniteError, match=r"step 4: the loss is nan.*skipped so far: steps \[3\]"):
        _train(env, tmp_path / "b", model=model, tokenizer=tok, callback=stays, skip_nonfinite=1)


def test_a_nonfinite_gradient_norm_with_a_finite_loss_stops_the_run(env, tmp_path):
    model, tok = _loaded(env)
    hooks = []

    def blow_up(rec):
        if rec["step"] == 1:
            p = model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
            hooks.append(p.register_hook(lambda g: g * float("inf")))

    with pytest.raises(NonFiniteError, match=r"step 2: the gradient norm is (inf|nan)"):
        _train(env, tmp_path / "run", model=model, tokenizer=tok, callback=blow_up)
    rec = [r for r in _lines(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert rec["step"] == 2 and rec["loss"] is not None and rec["grad_norm"] is None


def test_nonfinite_weights_are_never_saved_and_json_is_strict(tmp_path):
    from train_helpers import tiny_model, tiny_tokenizer
    m = lorart.methods.prepare(tiny_model(tiny_tokenizer()), "lora", r=2)
    with torch.no_grad():
        m.trainable_parameters()[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to write.*NaN or infinite"):
        m.save(tmp_path / "a")
    with pytest.raises(ValueError, match="refusing to write.*NaN or infinite"):
        lorart.save_adapter(m.model, str(tmp_path / "b"))
    assert not os.listdir(tmp_path)
    assert _atomic.strict_json({"a": [float("nan"), float("inf"), 1.5], "b": (float("-inf"),)}) == \
        '{"a": [null, null, 1.5], "b": [null]}'
    with pytest.raises(ValueError):
        lorart.methods.base.write_json(str(tmp_path / "c.json"), {"alpha": float("nan")})


# -- the command line -----------------------------------------------------------------------------------------
CLI_RUN = ("train", "--max-steps", "3", "--batch-size", "4", "--max-seq-len", "48", "--num-samples", "0",
           "--no-general", "--r", "4", "--save-every", "1", "--eval-every", "3")


def test_cli_nonfinite_loss_is_one_error_line(env, tmp_path):
    m, tok = _loaded(env)
    with torch.no_grad():
        _base_weight(m)[3, 5] = float("inf")
    lorart.models.save_hf_folder(m, str(tmp_path / "bad"), tok)
    out = tmp_path / "out"
    line = _one_error_line(_cli(*CLI_RUN, "--model", tmp_path / "bad", "--data", env["data"], "--eval-data",
                                env["eval"], "--output-dir", out))
    assert "step 1: the loss is nan" in line and "newest checkpoint kept: none" in line
    assert not (out / "adapter").exists()
    assert _lines(out / "metrics.jsonl")[0]["loss"] is None


def test_cli_second_run_and_busy_or_missing_folder(env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(env["dir"] / "ref", out)
    line = _one_error_line(_cli(*CLI_RUN, "--model", env["model"], "--data", env["data"], "--output-dir", out))
    assert "holds a previous run" in line and "--overwrite" in line and "--resume" in line


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || exit 1"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs via unshare is Linux-only")
def test_cli_disk_full_and_read_only_folder_are_one_error_line(env, tmp_path):
    """A real full disk (a 40 KiB tmpfs in a private mount namespace) and a read-only folder."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = (*CLI_RUN, "--model", env["model"], "--data", env["data"], "--eval-data", env["eval"], "--output-dir",
            mnt / "out")
    if _unshare_ok():
        full = _cli(*args, prefix=("unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=40k tmpfs "{mnt}" && '
                                   'exec "$0" "$@"'))
        line = _one_error_line(full)
        assert "no space left on the device" in line and "newest checkpoint kept" in line, line
        ro = _cli(*args, prefix=("unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro,size=40k tmpfs "{mnt}" && '
                                 'exec "$0" "$@"'))
        assert "read-only file system" in _one_error_line(ro)
    elif os.geteuid() != 0:
        os.chmod(mnt, 0o555)
        try:
            assert "Permission denied" in _one_error_line(_cli(*args))
        finally:
            os.chmod(mnt, 0o755)
    else:
        pytest.skip("no unshare/tmpfs and running as root (chmod does not stop root)")


def test_model_fingerprint_sees_any_weight_nf4_buffers_included():
    from train_helpers import tiny_model, tiny_tokenizer

    from lorart.nn import NF4Linear
    from lorart.training.fingerprint import model_fingerprint
    m = tiny_model(tiny_tokenizer())
    m.model.layers[1].mlp.up_proj = NF4Linear.from_linear(m.model.layers[1].mlp.up_proj)
    a = model_fingerprint(m)
    assert model_fingerprint(m) == a
    packed = m.model.layers[1].mlp.up_proj._nf4_packed
    with torch.no_grad():
        packed.view(-1)[packed.numel() // 3] ^= 1          # one 4-bit code of a frozen NF4 weight
    b = model_fingerprint(m)
    assert b["weights"] != a["weights"] and b["config"] == a["config"]
    with torch.no_grad():
        m.model.norm.weight[7] += 1e-6                      # one float, one ulp-ish change
    assert model_fingerprint(m)["weights"] != b["weights"]
