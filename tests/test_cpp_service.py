"""The C++ library from the outside: safetensors byte compatibility with the Python
`safetensors` package, and the example service (built through find_package(lorart))
against PEFT / torch references, dense and NF4 bases."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cpp_build import build_example

PREFIX = "model.layers.0.self_attn.q_proj"
IN, OUT = 64, 24


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    return build_example(tmp_path_factory.mktemp("cpp"))


# ---- safetensors byte compatibility -------------------------------------------------

def _sample_tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(7, generator=g).to(torch.float16),
        "b.i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
        "b.i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "c.u8": torch.arange(5, dtype=torch.uint8),
        "c.i8": torch.tensor([-1, 2], dtype=torch.int8),
        "d.bool": torch.tensor([True, False, True]),
        "e.f64": torch.randn(2, 2, dtype=torch.float64, generator=g),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "x.i16": torch.tensor([1, -2], dtype=torch.int16),  # no lorart dtype: copied as bytes
    }


@pytest.mark.parametrize("mmap", [True, False])
def test_safetensors_roundtrip_is_byte_identical(bins, tmp_path, mmap):
    src, dst = tmp_path / "py.safetensors", tmp_path / "cpp.safetensors"
    tensors = _sample_tensors()
    tensors.pop("x.i16")
    save_file(tensors, str(src), metadata={"format": "pt", "note": 'é "q"\n\\'})
    cmd = [str(bins["st_copy"]), str(src), str(dst)] + ([] if mmap else ["--no-mmap"])
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(r.stdout)
    assert summary["mmap"] is mmap
    assert summary["tensors"]["w.bf16"] == {"dtype": "BF16", "shape": [4, 2]}
    assert summary["tensors"]["scalar"]["shape"] == []
    # lorart's writer produces the reference implementation's exact bytes ...
    assert dst.read_bytes() == src.read_bytes()
    # ... and Python reads them back (values, dtypes, metadata)
    back = load_file(str(dst))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": 'é "q"\n\\'}


def test_safetensors_unknown_dtype_fails_clearly(bins, tmp_path):
    src, dst = tmp_path / "i16.safetensors", tmp_path / "out.safetensors"
    save_file({"x.i16": torch.tensor([1, -2], dtype=torch.int16)}, str(src))
    r = subprocess.run([str(bins["st_copy"]), str(src), str(dst)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "tensor 'x.i16': dtype I16 has no lorart::DType" in r.stderr
    assert not dst.exists()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b[:-3], "go past the data section"),  # truncated data
        (lambda b: b[:20], "exceeds the file"),  # truncated header
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "exceeds the limit of 100000000"),
        (lambda b: b[:8] + b"[" + b[9:], "starting with '{'"),
        (lambda b: b + b"\0" * 8, "trailing bytes"),
    ],
)
def test_corrupt_files_name_the_file(bins, tmp_path, corrupt, message):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, dtype=torch.int64)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(good.read_bytes()))
    r = subprocess.run([str(bins["st_copy"]), str(bad), str(tmp_path / "o.safetensors")], capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert "bad.safetensors" in r.stderr and message in r.stderr, r.stderr


# ---- the example service --------------------------------------------------------------

class Tiny(torch.nn.Module):
    """A module tree whose linear layer sits at PREFIX, as in a Llama checkpoint."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.model.layers[0].self_attn = torch.nn.Module()
        self.model.layers[0].self_attn.q_proj = torch.nn.Linear(IN, OUT, bias=True)

    def forward(self, x):
        return self.model.layers[0].self_attn.q_proj(x)


def _save_adapter(model: Tiny, folder: Path, r: int, alpha: float, rslora: bool, dtype: torch.dtype):
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)  # B starts at 0: make the adapter do something
    pm.save_pretrained(str(folder))
    pm.unload()
    st = folder / "adapter_model.safetensors"
    if dtype != torch.float32:
        save_file({k: v.to(dtype) for k, v in load_file(str(st)).items()}, str(st))


def _adapter_ref(folder: Path):
    """(A, B, scaling) read back from the files (the PEFT formula's inputs)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    A = sd[f"base_model.model.{PREFIX}.lora_A.weight"].float()
    B = sd[f"base_model.model.{PREFIX}.lora_B.weight"].float()
    r = cfg["r"]
    s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return A, B, s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("svc")
    model = Tiny()
    lin = model.model.layers[0].self_attn.q_proj
    save_file({f"{PREFIX}.weight": lin.weight.detach().clone(), f"{PREFIX}.bias": lin.bias.detach().clone(),
               "lm_head.weight": torch.randn(3, 3)}, str(d / "dense.safetensors"))
    _save_adapter(model, d / "a1", r=4, alpha=8, rslora=False, dtype=torch.float32)
    _save_adapter(model, d / "a2", r=2, alpha=16, rslora=True, dtype=torch.bfloat16)
    return {"dir": d, "model": model}


def _serve(bins, base: Path, adapters: dict, requests: list, module: str | None = None) -> list:
    cmd = [str(bins["service"]), "--base", str(base), "--prefix", PREFIX]
    if module:
        cmd += ["--module", module]
    for name, folder in adapters.items():
        cmd += ["--adapter", f"{name}={folder}"]
    inp = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
    r = subprocess.run(cmd, input=inp, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def _peft_reference(setup, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """PEFT itself: the saved adapters loaded into the model, the named one active."""
    import peft

    model = setup["model"]
    d = setup["dir"]
    pm = peft.PeftModel.from_pretrained(model, str(d / "a1"), adapter_name="a1")
    pm.load_adapter(str(d / "a2"), adapter_name="a2")
    try:
        with torch.no_grad():
            if adapter is None:
                with pm.disable_adapter():
                    return pm(x)
            pm.set_adapter(adapter)
            return pm(x)
    finally:
        pm.unload()


def test_service_dense_matches_peft(bins, setup):
    d = setup["dir"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, IN, generator=g)
    reqs = [
        {"id": 1, "adapter": "a1", "x": x[0].tolist()},
        {"id": 2, "adapter": "a2", "x": x[1].tolist()},
        {"id": 3, "adapter": None, "x": x[2].tolist()},
        {"id": 4, "adapter": ["a2", None, "a1", "a1"], "x": x.tolist()},
        {"id": 5, "adapter": "a1", "x": x[:2].tolist()},
    ]
    out = _serve(bins, d / "dense.safetensors", {"a1": d / "a1", "a2": d / "a2"}, reqs)
    assert [o["id"] for o in out] == [1, 2, 3, 4, 5]
    xs = torch.tensor(x.tolist(), dtype=torch.float32)  # exactly what the service parsed
    ref = {a: _peft_reference(setup, xs, a) for a in ("a1", "a2", None)}

    def y(o):
        return torch.tensor(o["y"], dtype=torch.float32)

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y(out[0]), ref["a1"][0], **tol)
    torch.testing.assert_close(y(out[1]), ref["a2"][1], **tol)
    torch.testing.assert_close(y(out[2]), ref[None][2], **tol)
    mixed = torch.stack([ref["a2"][0], ref[None][1], ref["a1"][2], ref["a1"][3]])
    torch.testing.assert_close(y(out[3]), mixed, **tol)
    torch.testing.assert_close(y(out[4]), ref["a1"][:2], **tol)
    # the adapters really change the output, and the formula matches PEFT's
    assert (ref["a1"] - ref[None]).abs().max() > 1e-2
    A, B, s = _adapter_ref(d / "a2")
    lin = setup["model"].model.layers[0].self_attn.q_proj
    formula = F.linear(xs, lin.weight, lin.bias) + s * (xs @ A.T) @ B.T
    torch.testing.assert_close(formula, ref["a2"].detach(), rtol=1e-5, atol=1e-5)


def _nf4_decode_reference(sd: dict, p: str) -> torch.Tensor:
    """NF4 + double quant decode written from the format notes (not from lorart or bnb)."""
    qs = json.loads(bytes(sd[f"{p}.weight.quant_state.bitsandbytes__nf4"].tolist()))
    rows, cols = qs["shape"]
    bs = qs["blocksize"]
    packed = sd[f"{p}.weight"].flatten().to(torch.int64)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten()[: rows * cols]
    table = sd[f"{p}.weight.quant_map"]
    q = sd[f"{p}.weight.absmax"].to(torch.int64)
    nested = sd[f"{p}.weight.nested_absmax"]
    dyn = sd[f"{p}.weight.nested_quant_map"]
    absmax = dyn[q] * nested[torch.arange(q.numel()) // 256] + qs["nested_offset"]
    w = table[codes] * absmax[torch.arange(rows * cols) // bs]
    return w.reshape(rows, cols)


def test_service_nf4_base_matches_reference(bins, setup, tmp_path):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    d = setup["dir"]
    lin = setup["model"].model.layers[0].self_attn.q_proj
    packed, qs = bnbf.quantize_4bit(lin.weight.detach().clone(), blocksize=64, compress_statistics=True,
                                    quant_type="nf4")
    sd = {f"{PREFIX}.weight": packed, f"{PREFIX}.bias": lin.bias.detach().clone()}
    sd.update({f"{PREFIX}.weight.{k}": v for k, v in qs.as_dict(packed=True).items()})
    save_file(sd, str(tmp_path / "nf4.safetensors"))
    W = _nf4_decode_reference(load_file(str(tmp_path / "nf4.safetensors")), PREFIX)
    # the reference decoder agrees with bitsandbytes on this shape (row length a multiple of the blocksize)
    torch.testing.assert_close(W, bnbf.dequantize_4bit(packed, qs), rtol=0, atol=0)

    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(5))
    xs = torch.tensor(x.tolist())
    reqs = [{"adapter": "a1", "x": xs[0].tolist()}, {"adapter": None, "x": xs[1].tolist()},
            {"adapter": ["a2", "a1", None], "x": xs.tolist()}]
    out = _serve(bins, tmp_path / "nf4.safetensors", {"a1": d / "a1", "a2": d / "a2"}, reqs)
    base = F.linear(xs, W, lin.bias.detach())
    refs = {}
    for a in ("a1", "a2"):
        A, B, s = _adapter_ref(d / a)
        refs[a] = base + s * (xs @ A.T) @ B.T
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(out[0]["y"], dtype=torch.float32), refs["a1"][0], **tol)
    torch.testing.assert_close(torch.tensor(out[1]["y"], dtype=torch.float32), base[1], **tol)
    torch.testing.assert_close(torch.tensor(out[2]["y"], dtype=torch.float32),
                               torch.stack([refs["a2"][0], refs["a1"][1], base[2]]), **tol)


def test_service_errors_and_commands(bins, setup):
    d = setup["dir"]
    x = [0.0] * IN
    reqs = [
        {"adapter": "zz", "x": x},
        {"adapter": "a1", "x": x[:-1]},
        '{"adapter": "a1", "x": [1,]}',
        {"cmd": "list"},
        {"cmd": "unload", "adapter": "a1"},
        {"adapter": "a1", "x": x},
        {"cmd": "load", "adapter": "a3", "path": str(d / "a1")},
        {"cmd": "load", "adapter": "bad", "path": str(d / "nowhere")},
        {"cmd": "list"},
        {"adapter": ["a3"], "x": [x, x]},
        {"adapter": "a3", "x": x},
    ]
    out = _serve(bins, d / "dense.safetensors", {"a1": d / "a1", "a2": d / "a2"}, reqs)
    assert out[0] == {"error": "unknown adapter 'zz' (loaded: a1, a2)"}
    assert out[1]["error"] == f'"x": expected {IN} numbers (in_features), got {IN - 1}'
    assert out[2]["error"].startswith("json: at byte ") and "expected a JSON value" in out[2]["error"]
    assert out[3] == {"adapters": ["a1", "a2"], "in": IN, "out": OUT}
    assert out[4] == {"unloaded": True}
    assert "unknown adapter 'a1'" in out[5]["error"]
    assert out[6] == {"loaded": "a3"}
    assert "adapter_config.json' not found" in out[7]["error"]
    assert out[8]["adapters"] == ["a2", "a3"]
    assert "one name (or null) per row" in out[9]["error"]
    assert len(out[10]["y"]) == OUT


def test_service_refuses_bad_startup(bins, setup, tmp_path):
    d = setup["dir"]
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text((d / "a1" / "adapter_config.json").read_text())
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"PK\x03\x04")
    r = subprocess.run([str(bins["service"]), "--base", str(d / "dense.safetensors"), "--prefix", PREFIX,
                        "--adapter", f"p={tmp_path / 'pickle'}"], input="", capture_output=True, text=True)
    assert r.returncode == 1 and "pickle file and is refused" in r.stderr
    r = subprocess.run([str(bins["service"]), "--base", str(d / "dense.safetensors"), "--prefix", "nope"],
                       input="", capture_output=True, text=True)
    assert r.returncode == 1 and "no tensor named 'nope.weight'" in r.stderr


def test_consumer_build_uses_the_cmake_package(bins):
    cfg = bins["cmake_dir"] / "lorartConfig.cmake"
    assert cfg.is_file()
    text = cfg.read_text()
    assert "find_dependency(Threads)" in text and "lorartTargets.cmake" in text
    assert (bins["cmake_dir"] / "lorartConfigVersion.cmake").is_file()


def test_cmake_dir_flag():
    import sys

    from lorart.__main__ import cmake_dir

    r = subprocess.run([sys.executable, "-m", "lorart", "--cmake-dir"], capture_output=True, text=True)
    if cmake_dir() is None:  # a development checkout: no package inside python/lorart
        assert r.returncode == 1 and "no CMake package" in r.stderr
    else:  # an installed wheel
        assert r.returncode == 0
        assert (Path(r.stdout.strip()) / "lorartConfig.cmake").is_file()
