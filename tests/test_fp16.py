"""float16 training with dynamic loss scaling (torch.amp.GradScaler; run here on the CPU, as on CUDA): an overflow
of the scale skips the step and lowers the scale without counting as a non-finite step; a gradient still
non-finite at the smallest scale is one; the scaler's state resumes bit-identically. And a GPU whose architecture
lorart's kernels were not compiled for is refused at the start with the reason (the decision tested with fakes)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import lorart
from lorart.training import NonFiniteError, precision
from lorart.training.precision import LossScaler

sys.path.insert(0, os.path.dirname(__file__))
from conftest import requires_cuda  # noqa: E402
from train_helpers import tiny_folder  # noqa: E402

OPTS = dict(max_steps=5, batch_size=2, max_seq_len=32, lr=5e-3, warmup=0, r=4, dropout=0.1, eval_every=5,
            save_every=1, num_samples=0, general_data=False, progress=False, dtype="float16")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16")
    p = lorart.data.default_dataset_paths()
    (d / "data.jsonl").write_text("\n".join(open(p["train"], encoding="utf-8").read().splitlines()[:16]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(open(p["heldout"], encoding="utf-8").read().splitlines()[:2]) + "\n")
    return {"model": tiny_folder(d / "model"), "data": str(d / "data.jsonl"), "eval": str(d / "eval.jsonl")}


def _train(env, out, **kw):
    return lorart.train(kw.pop("model", env["model"]), env["data"], eval_data=env["eval"], output_dir=out,
                        **{**OPTS, **kw})


def _steps(path):
    return [json.loads(ln) for ln in open(path / "metrics.jsonl") if '"loss"' in ln]


def test_outcome_rules():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    s = LossScaler(torch.device("cpu"), torch.float16, opt)
    assert s.enabled and s.scale == precision.INIT_SCALE
    assert s.outcome(1.0, 0.5) == "ok"
    assert s.outcome(1.0, float("inf")) == "overflow" and s.outcome(1.0, float("nan")) == "overflow"
    assert s.outcome(float("nan"), 0.5) == "nonfinite"   # no scale explains a non-finite loss
    off = LossScaler(torch.device("cpu"), torch.bfloat16, opt)
    assert not off.enabled and off.scale == 1.0 and off.outcome(1.0, float("inf")) == "nonfinite"

    # an overflow halves the scale and leaves the weights alone; a clean step updates them
    s.backward((p * 1e35).sum())          # 1e35 * 65536 is inf in float32: the scaled gradients overflow
    s.unscale()
    g = float(torch.linalg.vector_norm(p.grad))
    assert s.outcome(1.0, g) == "overflow"
    s.step("overflow")
    assert torch.equal(p.detach(), torch.ones(2)) and s.scale == precision.INIT_SCALE / 2
    opt.zero_grad()
    s.backward(p.sum())
    s.unscale()
    assert torch.equal(p.grad, torch.ones(2))   # unscaled before clipping and the gradient norm
    s.step("ok")
    assert torch.equal(p.detach(), torch.zeros(2))


def test_the_scale_never_goes_below_the_minimum(monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0)
    p = torch.nn.Parameter(torch.ones(1))
    s = LossScaler(torch.device("cpu"), torch.float16, torch.optim.SGD([p], lr=1.0))
    for expected in (1.0, 1.0):
        s.backward((p * float("inf")).sum())
        s.unscale()
        s.step(s.outcome(1.0, float("inf")))
        assert s.scale == expected
        assert s.outcome(1.0, float("inf")) == "nonfinite"   # at the smallest scale: the non-finite rule


def test_overflows_are_skipped_and_logged_not_a_nonfinite_stop(env, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 18)   # too large for these gradients: overflows first
    model, tok = lorart.models.load_model(env["model"], dtype=torch.float16)
    seen = []

    def watch(rec):   # LoRA B starts at zero: it stays zero while steps are skipped
        b = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        seen.append((rec.get("overflow", False), bool(b.detach().abs().sum() > 0)))

    res = _train(env, tmp_path / "run", model=model, tokenizer=tok, callback=watch)   # skip_nonfinite=0
    assert res.steps == 5 and res.skipped_steps == []
    n = len(res.overflow_steps)
    assert res.overflow_steps == list(range(1, n + 1)) and 1 <= n < 5
    assert seen == [(True, False)] * n + [(False, True)] * (5 - n)
    recs = _steps(tmp_path / "run")
    assert [r["loss_scale"] for r in recs[:n + 1]] == [2.0 ** (18 - i) for i in range(n + 1)]
    assert all(r["grad_norm"] is None for r in recs[:n]) and all(r["grad_norm"] > 0 for r in recs[n:])
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["overflow_steps"] == res.overflow_steps and summary["skipped_steps"] == []


def test_a_gradient_nonfinite_at_every_scale_is_a_nonfinite_stop(env, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 4.0)
    model, tok = lorart.models.load_model(env["model"], dtype=torch.float16)
    hooks = []

    def blow_up(rec):
        if rec["step"] == 1:
            p = model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
            hooks.append(p.register_hook(lambda g: g * float("inf")))

    with pytest.raises(NonFiniteError, match=r"step 4: the gradient norm is (inf|nan) even at the smallest float16 "
                                             r"loss scale \(1\)"):
        _train(env, tmp_path / "run", model=model, tokenizer=tok, callback=blow_up)
    recs = _steps(tmp_path / "run")
    assert [(r["step"], r["loss_scale"], bool(r.get("overflow")), bool(r.get("skipped"))) for r in recs] == [
        (1, 4.0, False, False), (2, 4.0, True, False), (3, 2.0, True, False), (4, 1.0, False, True)]


def test_resume_restores_the_loss_scale_bit_identically(env, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 18)
    ref = _train(env, tmp_path / "ref")

    def die(rec):
        if rec["step"] == 3:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        _train(env, tmp_path / "run", callback=die, save_every=2)
    res = _train(env, tmp_path / "run", resume=True, save_every=2)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa
    assert strip(_steps(tmp_path / "run")) == strip(_steps(tmp_path / "ref"))
    assert res.overflow_steps == ref.overflow_steps and res.after == ref.after


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_float16_on_cuda_scales_the_loss_and_skips_overflows(env, tmp_path, monkeypatch, method):
    # the same rules on the GPU (GradScaler("cuda"), lorart's CUDA kernels under float16 autocast): a scale too
    # large for the gradients overflows first, those steps are skipped, then the run trains with finite numbers;
    # the scaler's state is in the checkpoint
    from lorart.training.checkpoint import load_checkpoint
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0 ** 18)
    res = _train(env, tmp_path / method, method=method, device="cuda", max_steps=6, eval_every=6)
    n = len(res.overflow_steps)
    assert res.overflow_steps == list(range(1, n + 1)) and 1 <= n < 6 and res.skipped_steps == []
    recs = _steps(tmp_path / method)
    assert [r["loss_scale"] for r in recs[:n + 1]] == [2.0 ** (18 - i) for i in range(n + 1)]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in recs[n:])
    assert res.after["eval_loss"] is not None and torch.isfinite(torch.tensor(res.after["eval_loss"]))
    _, saved = load_checkpoint(str(tmp_path / method / "checkpoints" / "step-0000006"))
    assert saved["scaler"]["scale"] == recs[-1]["loss_scale"]


def test_bitfit_cannot_train_in_float16_and_says_so_before_loading(env, tmp_path):
    # BitFit keeps its biases in the layers' dtype: GradScaler refuses to unscale float16 gradients
    with pytest.raises(ValueError, match="argument `dtype`: float16 trains with loss scaling, which needs float32 "
                                         "trainable weights, but method 'bitfit' keeps"):
        _train(env, tmp_path / "run", method="bitfit", model="/nonexistent")
    assert not (tmp_path / "run").exists()
    for method in ("full", "adapter", "prefix", "prompt", "qlora"):   # float32 masters: they train
        res = _train(env, tmp_path / method, method=method, max_steps=1, eval_every=1)
        assert res.steps == 1 and res.history[0]["loss_scale"] == precision.INIT_SCALE


# -- a GPU the kernels were not compiled for ---------------------------------------------------------------------
@pytest.mark.parametrize("cc, compiled, cuda_compiled, usable, expect", [
    (90, "80,90", True, 1, None), (86, "80,90", True, 1, None),
    (120, "80,90", True, 1, None),                       # PTX of sm_90 is JIT-compiled for it: allowed
    (75, "80,90", True, 1, "GPU Tesla T4 (sm_75) is not an architecture lorart's CUDA kernels were compiled for "
                           "(sm_80, sm_90), and no compiled PTX can be JIT-compiled for it; rebuild for it "
                           "(CUDAARCHS=75"),
    (100, "90a", True, 1, "(sm_90a)"),
    (90, "", False, 0, "this lorart build has no CUDA kernels"),
    (90, "90", True, 0, "lorart's CUDA kernels cannot use the GPU: CUDA driver too old"),
])
def test_gpu_problem_decision(cc, compiled, cuda_compiled, usable, expect):
    from lorart.sysinfo import gpu_problem
    got = gpu_problem(cc, "Tesla T4", compiled, cuda_compiled, usable, "CUDA driver too old")
    assert (got is None) if expect is None else (expect in got), got


def _fake_gpu(monkeypatch, cc=(7, 5), archs="80,90"):
    import lorart._core as core
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    real = core.build_info
    monkeypatch.setattr(core, "build_info", lambda: {**real(), "cuda_compiled": True, "cuda_architectures": archs,
                                                     "cuda_devices": 1})


def test_train_refuses_an_uncompiled_gpu_at_the_start(env, tmp_path, monkeypatch, capsys):
    _fake_gpu(monkeypatch)
    from lorart.training.setup import resolve_device
    with pytest.raises(ValueError, match=r"device cuda: GPU Tesla T4 \(sm_75\) is not an architecture"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"'cuda:1': torch sees 1 CUDA GPU\(s\)"):
        resolve_device("cuda:1")
    from lorart.__main__ import main
    monkeypatch.delenv("LORART_DEBUG", raising=False)
    rc = main(["train", "--model", env["model"], "--device", "cuda", "--output-dir", str(tmp_path / "o")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "sm_75" in lines[0] and "--device cpu" in lines[0], lines
    assert not (tmp_path / "o").exists()
    _fake_gpu(monkeypatch, cc=(9, 0))
    assert resolve_device("cuda") == torch.device("cuda")


def test_the_default_dtype_is_float16_on_a_gpu_without_bfloat16(monkeypatch):
    # a T4 / V100 (sm_75 / sm_70) has no bfloat16 arithmetic: the default is float16 with loss scaling there, as
    # users of those GPUs expect; a method that keeps float16 trainable tensors (BitFit) gets float32 instead of a
    # refusal it did not ask for; an asked dtype is kept
    from lorart.training import TrainOptions
    from lorart.training.setup import default_dtype, resolve_dtype
    cuda = torch.device("cuda")
    assert default_dtype(torch.device("cpu")) == torch.float32
    for bf16, expect in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, v=bf16: v)
        assert default_dtype(cuda) == expect
        assert resolve_dtype(TrainOptions(), cuda) == expect
        assert resolve_dtype(TrainOptions(), cuda, keeps_dtypes=True) == (torch.bfloat16 if bf16 else torch.float32)
        assert resolve_dtype(TrainOptions(dtype="bfloat16"), cuda, keeps_dtypes=True) == torch.bfloat16
