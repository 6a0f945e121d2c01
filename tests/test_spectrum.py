"""lorart.inspect_adapter / `lorart inspect`: singular values of s * B @ A from r x r cores, against numpy's SVD of
the full product and matrices of known rank."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from lorart.spectrum import InspectError, effective_rank, inspect_adapter, update_spectrum


def _pair(rng, out, inp, r, rank=None, dtype=np.float64):
    """A [r, in], B [out, r] whose product has exactly `rank` (default r) nonzero singular values."""
    A = rng.standard_normal((r, inp))
    B = rng.standard_normal((out, r))
    if rank is not None:
        B[:, rank:] = 0.0
    return A.astype(dtype), B.astype(dtype)


@pytest.mark.parametrize("out,inp,r", [(64, 48, 8), (7, 300, 16), (300, 5, 4), (33, 33, 33), (10, 12, 1)])
def test_spectrum_matches_numpy_svd_of_the_full_product(out, inp, r):
    rng = np.random.default_rng(out * 1000 + inp)
    A, B = _pair(rng, out, inp, r)
    s = 2.5
    full = np.linalg.svd(s * B @ A, compute_uv=False)[:r]
    got = update_spectrum(A, B, s)
    k = min(out, inp, r)
    np.testing.assert_allclose(got[:k], full[:k], rtol=1e-10, atol=1e-10 * full[0])
    assert np.all(got[k:] <= 1e-10 * full[0])
    assert got.shape == (min(r, out),) or got.shape[0] >= k


@pytest.mark.parametrize("rank", [0, 1, 3, 7])
def test_known_rank(rank):
    rng = np.random.default_rng(rank)
    A, B = _pair(rng, 96, 80, 8, rank=rank)
    sig = update_spectrum(A, B)
    assert int((sig > 1e-9 * max(sig.max(), 1e-300)).sum()) == rank if rank else np.all(sig == 0)
    assert effective_rank(sig, 0.99) <= rank and effective_rank(sig, 0.999999) == rank


def test_effective_rank_from_energy():
    assert effective_rank([3.0, 4.0, 0.0], 0.5) == 1          # 16 of 25
    assert effective_rank([4.0, 3.0], 0.64) == 1
    assert effective_rank([4.0, 3.0], 0.65) == 2
    assert effective_rank([1.0] * 10, 0.9) == 9
    assert effective_rank([1.0] * 10, 0.99) == 10
    assert effective_rank([0.0, 0.0], 0.9) == 0


def test_torch_inputs_non_contiguous_and_bf16():
    g = torch.Generator().manual_seed(0)
    At = torch.randn(40, 6, generator=g).t()        # [6, 40], non-contiguous
    B = torch.randn(30, 6, generator=g, dtype=torch.bfloat16)
    full = np.linalg.svd(B.double().numpy() @ At.double().numpy(), compute_uv=False)[:6]
    np.testing.assert_allclose(update_spectrum(At, B), full, rtol=1e-9)


def test_bad_inputs():
    with pytest.raises(InspectError, match="same r"):
        update_spectrum(np.ones((4, 10)), np.ones((5, 3)))
    with pytest.raises(InspectError, match="NaN or inf"):
        update_spectrum(np.full((2, 3), np.nan), np.ones((4, 2)))
    assert update_spectrum(np.zeros((0, 3)), np.zeros((4, 0))).shape == (0,)


# ---- adapter folders -----------------------------------------------------------------------------------------
def _write_peft(folder, pairs, r, alpha, rslora=False, extra_cfg=None):
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for path, (A, B) in pairs.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.astype(np.float32)
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.astype(np.float32)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
           "target_modules": ["q_proj", "v_proj"], **(extra_cfg or {})}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def test_inspect_folder_scales_ranks_and_suggests_r(tmp_path):
    rng = np.random.default_rng(1)
    pairs = {}
    for i in range(3):
        pairs[f"model.layers.{i}.self_attn.q_proj"] = _pair(rng, 32, 32, 8, rank=2)
        pairs[f"model.layers.{i}.self_attn.v_proj"] = _pair(rng, 16, 32, 8, rank=i + 1)
    d = _write_peft(tmp_path / "ad", pairs, r=8, alpha=16)
    rep = inspect_adapter(d)
    assert len(rep.layers) == 6 and [s.layer for s in rep.layers] == [0, 0, 1, 1, 2, 2]
    assert [s.module for s in rep.layers[:2]] == ["q_proj", "v_proj"]
    for s in rep.layers:
        A, B = pairs[s.path]
        full = np.linalg.svd(2.0 * B.astype(np.float32).astype(np.float64) @ A.astype(np.float32), compute_uv=False)
        np.testing.assert_allclose(s.singular_values[:4], full[:4], rtol=1e-6, atol=1e-9 * full[0])
        assert s.scale == 2.0
        assert math.isclose(s.update_norm, np.linalg.norm(full), rel_tol=1e-9)
        assert s.rank99 <= (2 if s.module == "q_proj" else s.layer + 1)
    assert rep.suggested_r in (1, 2, 4)
    assert "suggested r" in rep.table()
    rs = inspect_adapter(_write_peft(tmp_path / "rs", pairs, r=8, alpha=16, rslora=True))
    assert rs.layers[0].scale == pytest.approx(16 / math.sqrt(8))


def test_inspect_with_base_gives_relative_norm_and_png(tmp_path):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from train_helpers import tiny_folder

    from lorart.models import load_model
    base = tiny_folder(tmp_path / "base")
    model, _ = load_model(base)
    rng = np.random.default_rng(2)
    pairs = {}
    for i in range(2):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            lin = model.get_submodule(f"model.layers.{i}.{mod}")
            pairs[f"model.layers.{i}.{mod}"] = _pair(rng, lin.out_features, lin.in_features, 4, rank=3)
    d = _write_peft(tmp_path / "ad", pairs, r=4, alpha=4)
    rep = inspect_adapter(d, base=base, png=str(tmp_path / "heat.png"))
    for s in rep.layers:
        W = model.get_submodule(s.path).weight.detach().double().numpy()
        A, B = pairs[s.path]
        dW = B.astype(np.float32).astype(np.float64) @ A.astype(np.float32).astype(np.float64)
        assert s.relative_norm == pytest.approx(np.linalg.norm(dW) / np.linalg.norm(W), rel=1e-6)
    with open(tmp_path / "heat.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "/||W||_F" in rep.table()
    rep2 = inspect_adapter(d, base=model)     # an nn.Module works too
    assert rep2.layers[0].relative_norm == pytest.approx(rep.layers[0].relative_norm)


def test_inspect_a_trained_lorart_adapter(tmp_path):
    """The folder lorart's LoRA method writes (PEFT layout, lorart_method.json beside it)."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from train_helpers import tiny_model, tiny_tokenizer

    import lorart
    tok = tiny_tokenizer()
    m = tiny_model(tok)
    meth = lorart.methods.prepare(m, "lora", {"r": 4, "targets": ("q_proj", "v_proj")})
    with torch.no_grad():
        for p in meth.trainable_parameters():
            p.normal_()
    d = meth.save(str(tmp_path / "lora"))
    rep = inspect_adapter(d, base=m)
    assert len(rep.layers) == 4 and all(s.r == 4 for s in rep.layers)
    for s in rep.layers:
        lay = m.get_submodule(s.path)
        dW = (lay.lora_B["default"].weight @ lay.lora_A["default"].weight).detach().double().numpy() * lay.scaling["default"]
        np.testing.assert_allclose(s.singular_values, np.linalg.svd(dW, compute_uv=False)[:4], rtol=1e-5)
        assert s.relative_norm == pytest.approx(np.linalg.norm(dW) / lay.base_layer.weight.detach().double().norm().item(),
                                                rel=1e-5)
    zero = lorart.methods.prepare(tiny_model(tok), "lora", {"r": 2})   # B = 0 at init
    rz = inspect_adapter(zero.save(str(tmp_path / "zero")))
    assert all(s.update_norm == 0 and s.rank90 == 0 for s in rz.layers) and "untrained" in rz.table()


def test_inspect_errors(tmp_path):
    with pytest.raises(InspectError, match="not a folder"):
        inspect_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InspectError, match="adapter_config.json"):
        inspect_adapter(tmp_path / "empty")
    rng = np.random.default_rng(0)
    d = _write_peft(tmp_path / "half", {"model.layers.0.self_attn.q_proj": _pair(rng, 8, 8, 2)}, 2, 2)
    from safetensors.numpy import save_file
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 8), np.float32)},
              os.path.join(d, "adapter_model.safetensors"))
    with pytest.raises(InspectError, match="partner"):
        inspect_adapter(d)
    d2 = _write_peft(tmp_path / "nan", {"model.layers.0.self_attn.q_proj": (np.full((2, 8), np.nan), np.ones((8, 2)))},
                     2, 2)
    with pytest.raises(InspectError, match="NaN"):
        inspect_adapter(d2)
    with open(os.path.join(d2, "adapter_model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        inspect_adapter(d2)
    d3 = _write_peft(tmp_path / "p", {"model.layers.0.self_attn.q_proj": _pair(rng, 8, 8, 2)}, 2, 2,
                     extra_cfg={"peft_type": "PROMPT_TUNING"})
    with pytest.raises(InspectError, match="peft_type"):
        inspect_adapter(d3)
    d4 = _write_peft(tmp_path / "png", {"model.layers.0.self_attn.q_proj": _pair(rng, 8, 8, 2)}, 2, 2)
    with pytest.raises(InspectError, match="does not exist"):
        inspect_adapter(d4, png=str(tmp_path / "no" / "such" / "x.png"))
    assert not list((tmp_path / "png").glob(".tmp-*"))


def test_cli_inspect(tmp_path, capsys):
    from lorart.__main__ import main
    rng = np.random.default_rng(3)
    d = _write_peft(tmp_path / "ad", {f"model.layers.{i}.self_attn.q_proj": _pair(rng, 16, 16, 4) for i in range(2)},
                    4, 8)
    assert main(["inspect", str(d), "--png", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "rank@90%" in out and "suggested r" in out and os.path.exists(tmp_path / "h.png")
    assert main(["inspect", str(d), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 2
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorart: error: ") and "not a folder" in err[0]
