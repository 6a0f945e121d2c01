"""The conformance harness: every op registered under torch.ops.lorart, checked the same way from the sample
inputs defined next to it (lorart.ops._define.Op.samples), in the spirit of ggml's test-backend-ops.

Per op: every registered op has a definition with samples (an op without fails); over float32, bfloat16,
float16 and float64 where the op takes them: the eager path, the dispatcher and the fake kernel agree (zero-size
samples included); non-contiguous / transposed / sliced / stride-0 / storage-offset layouts of every tensor
argument give the contiguous result or a clear error naming a layout requirement; under autocast the op equals
itself on the inputs its rule casts; torch.library.opcheck; gradcheck where differentiable;
torch.compile(fullgraph=True) equals eager (forward and backward); CPU equals CUDA where a GPU is usable.
The layout cases run once more in CI with MALLOC_PERTURB_ set (.ci/run).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lorart  # noqa: F401  (registers the ops)
from lorart.ops._define import REGISTRY

from conftest import requires_cuda

ALL = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lorart::"))
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


def _ids(cases):
    return [f"{n}-{DT[d]}" for n, d in cases]


# ---- helpers over nested arguments (tensors, lists of tensors, NF4 groups) -----------------------------------

def _map(fn, a):
    if isinstance(a, torch.Tensor):
        return fn(a)
    if isinstance(a, tuple) and hasattr(a, "_fields"):  # a group (NF4Args)
        return type(a)(*(_map(fn, v) for v in a))
    if isinstance(a, (list, tuple)):
        return type(a)(_map(fn, v) for v in a)
    return a


def _clone(args):
    return tuple(_map(lambda t: t.clone(), a) for a in args)


def _leaves(a):
    if isinstance(a, torch.Tensor):
        return [a]
    if isinstance(a, (list, tuple)):
        return [t for v in a for t in _leaves(v)]
    return []


def _tol(t: torch.Tensor) -> float:
    return {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(t.dtype, 0.0)


def _same(a, b, exact=True) -> bool:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if torch.equal(x, y) or (x.numel() and torch.isnan(x).any() and torch.equal(x.nan_to_num(), y.nan_to_num())):
            continue
        if exact or not x.dtype.is_floating_point:
            return False
        scale = y.abs().max().item() if y.numel() else 0.0
        if not torch.allclose(x.double(), y.double(), rtol=_tol(x), atol=_tol(x) * max(scale, 1e-30)):
            return False
    return True


def run(call, args, op):
    """call(*args) on clones: (outputs, the mutated arguments after the call)."""
    args = _clone(args)
    out = call(*args)
    return out, [args[i] for i in op.mutates]


def definition(name):
    """The op's definition; an op registered without one (or without samples) fails every test of it."""
    op = REGISTRY.get(name)
    if op is None or op.samples is None:
        pytest.fail(f"lorart::{name} has no lorart.ops._define.Op definition with sample inputs")
    return op


def samples(name, dtype, device="cpu"):
    s = definition(name).samples(device, dtype)
    if not s:
        pytest.skip(f"{name} takes no {dtype} on {device}")
    return s


CASES = [(n, d) for n in ALL for d in FLOATS]


# ---- the registry --------------------------------------------------------------------------------------------

def test_every_registered_op_has_a_definition_and_sample_inputs():
    assert len(ALL) >= 18, ALL
    missing = [n for n in ALL if n not in REGISTRY or REGISTRY[n].samples is None]
    empty = [n for n in ALL if n not in missing and not any(REGISTRY[n].samples("cpu", d) for d in FLOATS)]
    assert not missing and not empty, (f"ops without a definition or sample inputs: {missing}; ops whose sample "
                                       f"inputs are empty for every dtype: {empty}")
    zero = [n for n in ALL if not any(min((t.numel() for t in _leaves(s) if t.dtype.is_floating_point), default=1) == 0
                                      for d in FLOATS for s in REGISTRY[n].samples("cpu", d))]
    assert set(zero) <= {"nf4_quantize", "nf4_double_quant", "nf4_dequantize", "adamw8_step_"}, zero  # (no 0-size)


_PROBES = """
import sys, pytest, torch, lorart
from lorart.ops._define import Op

@torch.library.custom_op("lorart::probe_bare", mutates_args=())   # registered without an Op definition
def _bare(x: torch.Tensor) -> torch.Tensor:
    return x.clone()

def _impl(x: torch.Tensor) -> torch.Tensor:
    return x.clone()

kw = dict(check=lambda x: None, fake=lambda x: torch.empty_like(x))
Op("probe_no_samples", _impl, **kw)
Op("probe_empty_samples", _impl, samples=lambda device, dtype: [], **kw)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not cuda", sys.argv[1], "-k", sys.argv[2]]))
"""


def test_the_harness_fails_for_an_op_without_samples():
    """In a fresh process, three ops registered under torch.ops.lorart: without an Op definition, with an Op
    without samples, with samples for no dtype. The registry test names all three; every per-op test of the first
    two fails (none passes or is skipped)."""
    r = subprocess.run([sys.executable, "-c", _PROBES, __file__,
                        "every_registered or probe_bare or probe_no_samples"], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "['probe_bare', 'probe_no_samples']" in out and "['probe_empty_samples']" in out, out[-3000:]
    summary = out.strip().splitlines()[-1]
    assert " failed" in summary and "passed" not in summary and "skipped" not in summary, summary
    assert int(summary.split(" failed")[0].split()[-1]) >= 20, summary  # (2 ops x the per-op tests + the registry)


# ---- eager = dispatcher = fake ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", CASES, ids=_ids(CASES))
def test_eager_equals_dispatcher_and_fake(name, dtype):
    op = definition(name)
    for args in samples(name, dtype):
        eager = run(op, args, op)
        disp = run(op.dispatch, args, op)
        assert _same(eager, disp), name
        fake = run(op.dispatch, tuple(_map(lambda t: t.to("meta"), a) for a in args), op)[0]
        for r, f in zip(_leaves(eager[0]), _leaves(fake)):
            assert (r.shape, r.dtype) == (f.shape, f.dtype), name


# ---- layouts ---------------------------------------------------------------------------------------------------

def _layouts(t: torch.Tensor):
    """t's values (for stride 0: a broadcast of its first slice) in other layouts, each over storage of its own."""
    out = []
    if t.dim() >= 2:
        out.append(("transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)))
    if t.dim() >= 1:
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        big[..., 1::2].copy_(t)
        out.append(("sliced", big[..., 1::2]))
    flat = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
    out.append(("offset", flat[3:].view(t.shape).copy_(t)))
    if t.dim() >= 1 and t.shape[0] > 1:
        out.append(("stride0", t[:1].clone().expand_as(t)))
    return out


def _positions(args):
    """Paths to every tensor inside args: (i,), (i, j) for lists and groups."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            yield (i,)
        elif isinstance(a, (list, tuple)):
            for j, v in enumerate(a):
                if isinstance(v, torch.Tensor):
                    yield (i, j)


def _replace(args, path, v):
    args = list(args)
    if len(path) == 1:
        args[path[0]] = v
    else:
        a = args[path[0]]
        items = list(a)
        items[path[1]] = v
        args[path[0]] = type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
    return tuple(args)


def _get(args, path):
    return args[path[0]] if len(path) == 1 else args[path[0]][path[1]]


LAYOUT_CASES = [(n, d) for n in ALL for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", LAYOUT_CASES, ids=_ids(LAYOUT_CASES))
def test_noncontiguous_inputs_give_the_contiguous_result_or_a_clear_error(name, dtype):
    op = definition(name)
    for args in samples(name, dtype)[:2]:
        for path in _positions(args):
            for layout, v in _layouts(_get(args, path)):
                mutated = path[0] in op.mutates
                if mutated and layout == "stride0":
                    v = v.clone()  # (an in-place op writing through a broadcast is the caller's bug; torch refuses)
                want_args = _replace(_clone(args), path, v.clone(memory_format=torch.contiguous_format))
                got_args = _replace(_clone(args), path, v)
                try:
                    got = op(*got_args)
                except ValueError as e:
                    assert "contiguous" in str(e) or "stride" in str(e), (name, path, layout, str(e))
                    continue
                want = op(*want_args)
                assert _same(got, want, exact=False), (name, path, layout)
                for i in op.mutates:
                    assert _same(got_args[i], want_args[i], exact=False), (name, path, layout, "mutated", i)


@pytest.mark.parametrize("name", ["lora_linear", "lora_linear_nf4"])
def test_noncontiguous_inputs_fused_lora_kernels(name):
    """The same for the LoRA ops' fused small-M kernels (CUDA's default; on the CPU the reference, forced)."""
    from lorart.ops.lora import set_fused_policy
    old = set_fused_policy("always")
    try:
        test_noncontiguous_inputs_give_the_contiguous_result_or_a_clear_error(name, torch.float32)
    finally:
        set_fused_policy(old)


# ---- autocast --------------------------------------------------------------------------------------------------

AUTOCAST = [("cpu", torch.bfloat16),
            pytest.param("cuda", torch.bfloat16, marks=[requires_cuda, pytest.mark.cuda]),
            pytest.param("cuda", torch.float16, marks=[requires_cuda, pytest.mark.cuda])]


@pytest.mark.parametrize("device,acdt", AUTOCAST)
@pytest.mark.parametrize("name", ALL)
def test_autocast_is_the_ops_rule(name, device, acdt):
    """Under autocast an op equals itself (autocast off) on the inputs its rule casts, on the eager path and
    through the dispatcher; with autocast off nothing changes. Values against plain torch: test_ops_autocast.py."""
    op = definition(name)
    for args in samples(name, torch.float32, device)[:2]:
        want = run(op, op.autocast.cast(_clone(args), device), op)
        with torch.autocast(device, dtype=acdt):
            eager = run(op, args, op)
            disp = run(op.dispatch, args, op)
        assert _same(eager, want) and _same(disp, want), name
        with torch.autocast(device, dtype=acdt, enabled=False):
            assert _same(run(op, args, op), run(op.dispatch, args, op)), name


# ---- opcheck, gradcheck, compile -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_opcheck(name, device):
    """torch.library.opcheck (schema, autograd registration, fake kernel, AOT dispatch), differentiable inputs
    requiring grad."""
    op = definition(name)
    for args in samples(name, torch.float32, device)[:2]:
        args, _ = _diff_inputs(op, args, torch.float32)
        torch.library.opcheck(op.op, op.flatten(tuple(args)))


GRAD = [n for n in ALL if n not in REGISTRY or REGISTRY[n].backward is not None]


def _diff_inputs(op, args, dtype):
    """The sample's differentiable arguments (float tensors named in `diff`) as leaves requiring grad."""
    args = list(_clone(args))
    idx = [i for i in op.diff if isinstance(args[i], torch.Tensor) and args[i].dtype.is_floating_point]
    for i in idx:
        args[i] = args[i].detach().to(dtype).requires_grad_()
    return args, idx


@pytest.mark.parametrize("name", GRAD)
def test_gradcheck(name, device):
    """Analytic gradients (the eager autograd.Function and the op's registered autograd) against finite
    differences (gradcheck's fast mode: random projections of the Jacobian), in float64 where the op takes it,
    else (NF4: float32 only) in float32 with tolerances that suffice for these (bi)linear maps."""
    op = definition(name)
    f64 = bool(op.samples(device, torch.float64))
    dt = torch.float64 if f64 else torch.float32
    kw = dict(fast_mode=True) if f64 else dict(fast_mode=True, eps=1e-2, atol=2e-2, rtol=2e-2)
    nondiff = set(op.nondiff_outputs)
    for s in samples(name, dt, device)[:2]:
        args, idx = _diff_inputs(op, s, dt)
        if not all(args[i].numel() for i in idx):
            continue

        def f(*ts, call):
            a = list(args)
            for i, t in zip(idx, ts):
                a[i] = t
            out = call(*a)
            outs = out if isinstance(out, tuple) else (out,)
            return tuple(o for k, o in enumerate(outs) if k not in nondiff)

        inputs = tuple(args[i] for i in idx)
        for call in (op, op.dispatch):
            assert torch.autograd.gradcheck(lambda *ts: f(*ts, call=call), inputs, **kw), name


@pytest.mark.parametrize("name", ALL)
def test_compile_fullgraph_equals_eager(name):
    """torch.compile(fullgraph=True) (aot_eager: dynamo, AOTAutograd, the fake kernels, functionalisation; no
    codegen) equals eager, forward and (for differentiable ops) gradients."""
    op = definition(name)
    args = samples(name, torch.float32)[0]
    torch._dynamo.reset()  # (one lambda's code object for every op: each test starts from an empty cache)
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager", dynamic=False)
    eager_args, idx = _diff_inputs(op, args, torch.float32)
    comp_args = [a.detach().clone().requires_grad_() if i in idx else a for i, a in enumerate(_clone(eager_args))]
    y0, y1 = op(*eager_args), compiled(*comp_args)
    assert _same(y0, y1, exact=False), name
    for i in op.mutates:
        assert _same(eager_args[i], comp_args[i], exact=False), name
    if idx and op.backward is not None:
        out0 = y0[0] if isinstance(y0, tuple) else y0
        out1 = y1[0] if isinstance(y1, tuple) else y1
        g0 = torch.autograd.grad(out0.float().square().sum(), [eager_args[i] for i in idx], allow_unused=True)
        g1 = torch.autograd.grad(out1.float().square().sum(), [comp_args[i] for i in idx], allow_unused=True)
        for a, b in zip(g0, g1):
            assert (a is None) == (b is None) and (a is None or _same(a, b, exact=False)), name


# ---- CPU against CUDA ------------------------------------------------------------------------------------------

CUDA_CASES = [(n, d) for n in ALL for d in (torch.float32, torch.bfloat16, torch.float16)]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name,dtype", CUDA_CASES, ids=_ids(CUDA_CASES))
def test_cpu_equals_cuda(name, dtype):
    op = definition(name)
    cpu, gpu = op.samples("cpu", dtype), op.samples("cuda", dtype)
    if not cpu or not gpu:
        pytest.skip(f"{name} takes no {dtype} on one of the devices")
    for a, b in zip(cpu, gpu):
        c = run(op, a, op)
        g = run(op, b, op)
        g = (_map(lambda t: t.cpu(), g[0]), [_map(lambda t: t.cpu(), m) for m in g[1]])
        assert _same(c, g, exact=False), name
