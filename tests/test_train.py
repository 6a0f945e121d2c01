"""lorart.train on a tiny random Llama (resume equality, early stopping, checkpoints, errors, qlora) and a short
real run of the embedded default model."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import lorart
from lorart.training import checkpoint as ckpt

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_folder  # noqa: E402

FAST = dict(batch_size=8, max_seq_len=96, num_samples=2, sample_max_new_tokens=4, progress=False,
            general_data=False, r=4, alpha=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def _adapter(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _det(history):  # the records without wall-clock fields
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "elapsed_s")} for h in history]


def test_train_lowers_loss_and_writes_outputs(tiny, tmp_path):
    r = lorart.train(tiny, output_dir=tmp_path / "o", max_steps=6, lr=1e-2, eval_every=3, **FAST)
    assert r.after["eval_loss"] < r.before["eval_loss"] - 0.05
    assert r.steps == 6 and r.total_steps == 6
    for f in ("metrics.jsonl", "summary.json", "samples.md", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors"):
        assert os.path.isfile(tmp_path / "o" / f), f
    lines = [json.loads(x) for x in open(tmp_path / "o" / "metrics.jsonl")]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 7))
    assert [x["step"] for x in lines if "eval_loss" in x] == [3, 6]
    assert _det(lines) == _det(r.history)
    summary = json.load(open(tmp_path / "o" / "summary.json"))
    assert summary["after"]["eval_loss"] == pytest.approx(r.after["eval_loss"])
    assert summary["memory"]["peak_rss_mb"] > 10
    assert (r.plot_path is None) == any("matplotlib" in n for n in r.notes)
    md = open(r.samples_path).read()
    assert md.count("\n| ") == 1 + 2  # header + 2 samples
    # the adapter reloads onto a fresh copy of the base model with the same logits
    model, _ = lorart.models.load_model(tiny)
    lorart.load_adapter(model, r.adapter_dir)
    model.eval()  # (layers added by load_adapter start in training mode: dropout)
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    r.model.eval()
    torch.testing.assert_close(model(ids).logits, r.model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_exact(tiny, tmp_path, grad_accum):
    opts = dict(max_steps=6, lr=5e-3, eval_every=2, dropout=0.1, grad_accum=grad_accum, batch_size=16,
                **{k: v for k, v in FAST.items() if k != "batch_size"})
    full = lorart.train(tiny, output_dir=tmp_path / "full", **opts)

    class Crash(Exception):
        pass

    def crash(rec):
        if rec["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        lorart.train(tiny, output_dir=tmp_path / "part", callback=crash, **opts)
    # the crash came after step 3's checkpoint; step 2's was the last one written by save_every=eval_every
    assert ckpt.latest_checkpoint(str(tmp_path / "part")).endswith("step-0000002")
    res = lorart.train(tiny, output_dir=tmp_path / "part", resume=True, **opts)
    a, b = _adapter(full.adapter_dir), _adapter(res.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _det(full.history) == _det(res.history)
    assert full.after == res.after and full.before == res.before
    lines = [json.loads(x) for x in open(tmp_path / "part" / "metrics.jsonl")]
    assert _det(lines) == _det(full.history)


def test_resume_rejects_other_options(tiny, tmp_path):
    lorart.train(tiny, output_dir=tmp_path, max_steps=2, **FAST)
    with pytest.raises(ValueError, match=r"`resume`.*lr"):
        lorart.train(tiny, output_dir=tmp_path, max_steps=2, resume=True, lr=1e-3, **FAST)


def test_early_stopping(tiny, tmp_path):
    # a learning rate far too high makes the eval loss rise: stop after `patience` evaluations without a gain
    r = lorart.train(tiny, output_dir=tmp_path, max_steps=40, lr=0.5, warmup=0, schedule="constant", eval_every=1,
                     early_stopping_patience=2, max_grad_norm=None, **FAST)
    assert r.stopped_early and r.steps < 40
    evals = [h for h in r.history if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert r.best_step == best["step"]
    assert all(h["eval_loss"] >= best["eval_loss"] for h in evals if h["step"] > best["step"])
    assert len([h for h in evals if h["step"] > best["step"]]) == 2
    assert r.after["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)  # the best adapter was restored


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    state = {"weights": {"a": torch.ones(3)}, "state": {"step": 1}}
    ckpt.save_checkpoint(str(tmp_path), 1, state)
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-0000001")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(str(tmp_path), 2, state)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-0000001"]  # no temp folder, no half checkpoint
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-0000001")
    for s in (2, 3, 4):
        ckpt.save_checkpoint(str(tmp_path), s, state, keep=2)
    assert sorted(os.listdir(root)) == ["latest", "step-0000003", "step-0000004"]
    good = (root / "step-0000004" / "state.pt").read_bytes()
    (root / "step-0000004" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="truncated or replaced"):
        ckpt.load_checkpoint(str(root / "step-0000004"))
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1   # one bit of the tensor data: torch.load would not notice
    (root / "step-0000004" / "state.pt").write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(str(root / "step-0000004"))


def test_bad_options_and_data(tiny, tmp_path):
    with pytest.raises(ValueError, match="`method`"):
        lorart.train(tiny, output_dir=tmp_path, method="dora", **FAST)
    with pytest.raises(ValueError, match="`lr`"):
        lorart.train(tiny, output_dir=tmp_path, lr=-1, **FAST)
    with pytest.raises(ValueError, match="`batch_size`"):
        lorart.train(tiny, output_dir=tmp_path, **{**FAST, "batch_size": 0})
    with pytest.raises(TypeError, match="unknown argument.*'learning_rate'"):
        lorart.train(tiny, output_dir=tmp_path, learning_rate=1e-3, **FAST)
    with pytest.raises(ValueError, match="`targets`.*matched no linear"):
        lorart.train(tiny, output_dir=tmp_path, targets=["nope_proj"], **FAST)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        lorart.train(tiny, tmp_path / "missing.jsonl", output_dir=tmp_path, **FAST)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "x"\n')
    with pytest.raises(lorart.data.DataError, match=r"bad.jsonl:2: invalid JSON"):
        lorart.train(tiny, bad, output_dir=tmp_path, **FAST)
    bad.write_text('{"question": "hi"}\n')
    with pytest.raises(lorart.data.DataError, match="unknown record format"):
        lorart.train(tiny, bad, output_dir=tmp_path, **FAST)
    with pytest.raises(FileNotFoundError, match="no such model"):
        lorart.train(tmp_path / "nomodel", output_dir=tmp_path / "o", **FAST)


def test_records_and_eval_fraction(tiny, tmp_path):
    recs = [{"instruction": f"Say {w}.", "output": w} for w in ["apple", "pear", "plum", "fig", "lime"] * 4]
    r = lorart.train(tiny, recs, output_dir=tmp_path, max_steps=2, eval_fraction=0.2, **FAST)
    summary = json.load(open(r.summary_path))
    assert summary["train_examples"] == 16 and summary["eval_examples"] == 4
    assert r.after["format_accuracy"] is None  # no answer format for user data without format_regex


def test_qlora_trains_and_reloads(tiny, tmp_path):
    from lorart.nn import NF4Linear
    r = lorart.train(tiny, method="qlora", output_dir=tmp_path, max_steps=6, lr=1e-2, **FAST)
    assert r.after["eval_loss"] < r.before["eval_loss"] - 0.05
    base = r.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, NF4Linear)
    assert isinstance(r.model.model.layers[0].mlp.up_proj, NF4Linear)  # not a target: NF4, frozen
    fresh, _ = lorart.models.load_model(tiny, linear_factory=lambda n, lin: NF4Linear.from_linear(lin))
    lorart.load_adapter(fresh, r.adapter_dir)
    fresh.eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 7]])
    r.model.eval()
    torch.testing.assert_close(fresh(ids).logits, r.model(ids).logits, rtol=0, atol=0)


def test_default_model_short_run_lowers_heldout_loss(tmp_path):
    try:
        lorart.models.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    heldout = lorart.data.default_dataset_paths()["heldout"]
    lines = open(heldout).read().splitlines()[:8]
    ev = tmp_path / "heldout.jsonl"
    ev.write_text("\n".join(lines) + "\n")
    r = lorart.train(None, None, eval_data=ev, output_dir=tmp_path / "o", max_steps=2, batch_size=4,
                     max_seq_len=64, lr=1e-3, warmup=0, r=8, alpha=16, targets=["q_proj", "v_proj"],
                     num_samples=0, progress=False, general_data=False, eval_every=2)
    assert r.after["eval_loss"] < r.before["eval_loss"] - 0.2
    assert r.summary_path and json.load(open(r.summary_path))["model"] == "default"


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cuda_train_bf16(tiny, tmp_path, method):
    from conftest import CUDA_SKIP
    if CUDA_SKIP is not None:
        pytest.skip(CUDA_SKIP)
    r = lorart.train(tiny, method=method, device="cuda", output_dir=tmp_path / "o", max_steps=6, lr=1e-2,
                     eval_every=3, **FAST)
    assert r.after["eval_loss"] < r.before["eval_loss"] - 0.05
    assert r.memory["peak_gpu_allocated_mb"] > 0
    lora = [p for n, p in r.model.named_parameters() if p.requires_grad]
    assert lora and all(p.is_cuda and p.dtype == torch.float32 for p in lora)  # fp32 master weights
    # resume on the GPU (RNG, optimizer and data position restored); GPU kernels (attention backward, atomics)
    # may not be bitwise deterministic, so this compares with a tolerance (the CPU test checks bit equality)
    def crash(rec):
        if rec["step"] == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lorart.train(tiny, method=method, device="cuda", output_dir=tmp_path / "p", max_steps=6, lr=1e-2,
                     eval_every=3, callback=crash, **FAST)
    res = lorart.train(tiny, method=method, device="cuda", output_dir=tmp_path / "p", max_steps=6, lr=1e-2,
                       eval_every=3, resume=True, **FAST)
    a, b = _adapter(r.adapter_dir), _adapter(res.adapter_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
