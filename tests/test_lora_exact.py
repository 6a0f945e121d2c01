"""LoRA where a small bug hides: tight float64 / float32 checks of the forward on both sides of the fused-kernel
row limit and of every gradient; the dropout mask against an independent re-implementation of the counter
hash in cpp/include/lorart/detail/lora_math.h (written here from its definition, numpy uint32 arithmetic);
float64 merges; rank_pattern / alpha_pattern lookups against PEFT's own. (bench/mutants.py)"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lorart.ops import lora as L

M32 = np.uint64(0xFFFFFFFF)


# ---- the dropout mask, re-implemented ---------------------------------------------------------------------------

def mix32(x: np.ndarray) -> np.ndarray:
    """C. Wellons' "lowbias32" integer mixer: xorshift 16, * 0x7feb352d, xorshift 15, * 0x846ca68b, xorshift 16
    (arithmetic mod 2^32, in uint64 so that nothing overflows silently)."""
    x = np.asarray(x, dtype=np.uint64) & M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M32
    x ^= x >> np.uint64(16)
    return x


def dropout_keep(seed: int, p: float, n: int) -> np.ndarray:
    """Which of the elements 0..n-1 (row * K + col) the mask of (seed, p) keeps. Keys from the 64-bit seed:
    k1 = mix(lo32(seed) ^ mix(hi32(seed) + 0x9E3779B9)), k2 = mix(k1 + 0x632BE5AB); hash(i) =
    mix(mix(lo32(i) ^ k1) ^ (hi32(i) * 0x9E3779B1) ^ k2); kept when hash >= floor(p * 2^32)."""
    seed &= (1 << 64) - 1
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    k1 = int(mix32(lo ^ int(mix32((hi + 0x9E3779B9) & 0xFFFFFFFF))))
    k2 = int(mix32((k1 + 0x632BE5AB) & 0xFFFFFFFF))
    t = p * 4294967296.0
    threshold = 0xFFFFFFFF if t >= 4294967295.0 else int(t)
    i = np.arange(n, dtype=np.uint64)
    h = mix32(mix32((i & M32) ^ np.uint64(k1)) ^ (((i >> np.uint64(32)) * np.uint64(0x9E3779B1)) & M32)
              ^ np.uint64(k2))
    return h >= np.uint64(threshold)


# int64, as the op's schema takes them; a negative seed is taken mod 2^64
SEEDS = [0, 1, 12345, 2 ** 32 - 1, 2 ** 32 + 7, 3 << 40, 2 ** 63 - 1, -1, -5]


def test_mix32_known_values():
    # the mixer's published test vector (lowbias32(0) = 0; a fixed point) and a few values worked by hand
    assert int(mix32(0)) == 0
    x = 1
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    assert int(mix32(1)) == x


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_mask_is_the_documented_hash(device, p, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU only")
    x = torch.ones(7, 133, dtype=dtype, device=device)
    for seed in SEEDS:
        out = L.lora_dropout(x, p, seed).cpu()
        keep = torch.from_numpy(dropout_keep(seed, p, x.numel())).reshape(x.shape)
        assert torch.equal(out != 0, keep), f"seed {seed}"
        kept = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(out[keep], kept.to(dtype).expand(int(keep.sum()))), f"seed {seed}"


@pytest.mark.parametrize("rows", [3, 40])
def test_lora_linear_dropout_uses_the_documented_mask(device, rows):
    if device == "cuda":
        pytest.skip("float64 LoRA runs on the CPU only")
    g = torch.Generator().manual_seed(3)
    K, N, R, p, s = 48, 24, 4, 0.3, 1.5
    x, W, b = (torch.randn(*sh, generator=g, dtype=torch.float64) for sh in ((rows, K), (N, K), (N,)))
    A, B = torch.randn(R, K, generator=g, dtype=torch.float64), torch.randn(N, R, generator=g, dtype=torch.float64)
    for seed in (7, 2 ** 40 + 3):
        keep = torch.from_numpy(dropout_keep(seed, p, rows * K)).reshape(rows, K)
        xd = torch.where(keep, x / (1 - p), torch.zeros_like(x))
        ref = x @ W.T + b + s * (xd @ A.T) @ B.T
        torch.testing.assert_close(L.lora_linear(x, W, b, A, B, s, p, seed), ref, rtol=1e-12, atol=1e-12)


# ---- the forward and gradients, tight -------------------------------------------------------------------------

def problem(rows, dtype, K=64, N=40, R=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / 8
    b = torch.randn(N, generator=g, dtype=torch.float64)
    A = torch.randn(R, K, generator=g, dtype=torch.float64) / 8
    B = torch.randn(N, R, generator=g, dtype=torch.float64)   # a LoRA term as large as the base output
    return [t.to(dtype) for t in (x, W, b, A, B)]


def ref64(x, W, b, A, B, s):
    x, W, b, A, B = (t.double() for t in (x, W, b, A, B))
    return x @ W.T + b + s * (x @ A.T) @ B.T


@pytest.mark.parametrize("policy", ["auto", "never", "always"])
@pytest.mark.parametrize("rows", [1, 16, 17, 40, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_tight_on_both_sides_of_the_fused_row_limit(rows, dtype, policy):
    s = 2.5
    x, W, b, A, B = problem(rows, dtype)
    old = L.set_fused_policy(policy)
    try:
        y = L.lora_linear(x, W, b, A, B, s, 0.0, 0)
    finally:
        L.set_fused_policy(old)
    ref = ref64(x, W, b, A, B, s)
    base = ref64(x, W, b, A, torch.zeros_like(B), s)
    # fp32: a few roundings of values of size |x| |W| K; the LoRA term is as large as the base, so a LoRA term
    # off by 0.1% is off by ~1e-3 of the output: far outside
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    assert float((ref - base).abs().mean()) > 0.5 * float(base.abs().mean())


@pytest.mark.parametrize("rows", [5, 40])
def test_gradients_float64_tight(rows):
    s = 1.75
    x, W, b, A, B = problem(rows, torch.float64, seed=1)
    for t in (x, b, A, B):
        t.requires_grad_()
    y = L.lora_linear(x, W, b, A, B, s, 0.0, 0)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad(y, (x, b, A, B), go)
    want = torch.autograd.grad(ref64(x, W, b, A, B, s), (x, b, A, B), go)
    for name, g1, g2 in zip(("dx", "dbias", "dA", "dB"), got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_merge_float64_exact_scale():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64)
    A = torch.randn(6, 40, generator=g, dtype=torch.float64)
    B = torch.randn(24, 6, generator=g, dtype=torch.float64)
    s = 16 / 3   # not a float32 value
    ref = W + s * (B @ A)
    merged = W.clone()
    torch.ops.lorart.lora_merge_(merged, A, B, s)
    torch.testing.assert_close(merged, ref, rtol=1e-14, atol=1e-13)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    from torch import nn

    from lorart.nn import LoRALinear

    layer = LoRALinear(nn.Linear(20, 12, dtype=torch.float64), r=9, alpha=6, rslora=True)
    assert layer.scaling["default"] == 6 / math.sqrt(9) == 2.0
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 20, dtype=torch.float64)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ A.T) @ B.T, rtol=1e-12, atol=1e-12)


# ---- rank_pattern / alpha_pattern: PEFT's lookup ---------------------------------------------------------------

@pytest.mark.parametrize("order", [1, -1])
def test_pattern_lookup_is_pefts(tmp_path, order):
    other = pytest.importorskip("peft.utils.other")
    from lorart.adapters import read_lora_config

    ranks = dict(list({"q_proj": 4, r"layers\.1\.q_proj": 6, "layers.0.q_proj": 8, "v_proj": 2}.items())[::order])
    alphas = dict(list({r"layers\.[01]\..*proj": 3.0, "k_proj": 5.0, "layers.1.k_proj": 7.0}.items())[::order])
    cfg = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj"],
           "rank_pattern": ranks, "alpha_pattern": alphas}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    c = read_lora_config(str(tmp_path))
    for i in range(3):
        for leaf in ("q_proj", "k_proj", "v_proj"):
            path = f"model.layers.{i}.self_attn.{leaf}"
            rk, ak = other.get_pattern_key(list(ranks), path), other.get_pattern_key(list(alphas), path)
            assert c.rank(path) == ranks.get(rk, 16), path
            assert c.alpha_of(path) == alphas.get(ak, 32.0), path
