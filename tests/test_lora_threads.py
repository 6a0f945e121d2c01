"""Thread safety of the adapter API (docs/lora.md, "Threads"): per-thread adapter selection, adapter loading
and injection under one lock, all-or-nothing inject / load_adapter.

The model has a layer that sleeps between its LoRA layers, so that threads interleave inside every forward
(the GIL switches at each sleep): a selection shared between threads shows up as wrong outputs, not luck.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from torch import nn

import lorart
from lorart.inject import lora_layers
from lorart.nn import LoRALinear, NF4Linear


class Yield(nn.Module):
    """Gives the GIL away in the middle of a forward."""

    def forward(self, x):
        time.sleep(0.0005)
        return x


def tiny(n_layers: int = 3, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    mods = []
    for _ in range(n_layers):
        mods += [nn.Linear(width, width), Yield()]
    return nn.Sequential(*mods).eval()


def lin_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def with_adapters(names=("a", "b"), n_layers: int = 3) -> nn.Sequential:
    model = tiny(n_layers)
    for i, name in enumerate(names):
        lorart.inject(model, lin_paths(tiny(n_layers)), r=4, alpha=8, dropout=0.0, adapter_name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model).values():
            for name in names:
                m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape, generator=g))
    return model


def run_threads(targets) -> list[BaseException]:
    """Start one thread per callable at once; re-raise nothing, return the exceptions."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def wrap(f):
        def run():
            try:
                barrier.wait()
                f()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(f)) for f in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread hung"
    return errors


def reference_outputs(model, x, names):
    out = {}
    with torch.no_grad():
        for n in names:
            with lorart.adapter_ids(model, [n] * x.shape[0]):
                out[n] = model(x)
    return out


# ---- per-request selection ------------------------------------------------------------------------------------

def test_adapter_ids_contexts_in_several_threads_pick_their_own_adapter():
    model = with_adapters(("a", "b", "c"))
    x = torch.randn(2, 16)
    names = ["a", "b", "c", None]
    ref = reference_outputs(model, x, names)
    assert not torch.equal(ref["a"], ref["b"])
    wrong: list = []

    def worker(name):
        def f():
            for _ in range(15):
                with torch.no_grad(), lorart.adapter_ids(model, [name] * 2):
                    y = model(x)
                if not torch.equal(y, ref[name]):
                    wrong.append(name)
        return f

    assert run_threads([worker(n) for n in names * 2]) == []
    assert wrong == [], f"{len(wrong)} of 120 forwards used another thread's adapter"
    # no stale selection is left behind: the model runs its active adapter again
    assert all(m.adapter_ids is None for m in lora_layers(model).values())
    with torch.no_grad():
        lorart.set_adapter(model, "b")
        torch.testing.assert_close(model(x), ref["b"], rtol=1e-5, atol=1e-5)  # the single-adapter kernel


def test_a_thread_selection_does_not_leak_into_another_thread():
    model = with_adapters(("a", "b"))
    x = torch.randn(2, 16)
    lorart.set_adapter(model, "b")
    with torch.no_grad():
        yb = model(x)
    inside, done = threading.Event(), threading.Event()

    def holder():
        with lorart.adapter_ids(model, ["a", "a"]):
            inside.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            assert torch.equal(model(x), yb)   # this thread never entered a context: the active adapter
    finally:
        done.set()
        t.join(30)


def test_asyncio_tasks_on_one_thread_pick_their_own_adapter():
    """Request handlers as asyncio tasks on one event loop: each task's block holds across its awaits, and is not
    seen by the other tasks that run in between (a per-thread selection would hand them the wrong adapter)."""
    import asyncio
    model = with_adapters(("a", "b", "c"))
    x = torch.randn(2, 16)
    names = ["a", "b", "c", None]
    ref = reference_outputs(model, x, names)
    lorart.set_adapter(model, "b")
    with torch.no_grad():
        active = model(x)
    wrong = []

    async def handler(name):
        for _ in range(5):
            with lorart.adapter_ids(model, [name] * 2):
                await asyncio.sleep(0)         # the other tasks run here, inside this task's block
                if not torch.equal(model(x), ref[name]):
                    wrong.append(name)
                await asyncio.sleep(0)
            if not torch.equal(model(x), active):   # outside its block: the active adapter
                wrong.append(("outside", name))

    async def main():
        await asyncio.gather(*(handler(n) for n in names * 2))
        assert wrong == [], f"{len(wrong)} forwards used another task's adapter: {wrong[:5]}"

        # a task created inside a block sees it while the block is open, and not after it ends
        gate, seen = asyncio.Event(), []

        async def child():
            seen.append(torch.equal(model(x), ref["a"]))
            await gate.wait()
            seen.append(torch.equal(model(x), active))

        with lorart.adapter_ids(model, ["a", "a"]):
            task = asyncio.create_task(child())
            await asyncio.sleep(0)
        gate.set()
        await task
        assert seen == [True, True]

    with torch.no_grad():   # outside the tasks: torch's grad mode is per thread, not per task
        asyncio.run(main())
    assert lorart.nn.selection.SELECTIONS.active == 0


def test_explicit_per_call_ids_and_nested_contexts():
    model = with_adapters(("a", "b"))
    x = torch.randn(3, 16)
    ref = reference_outputs(model, x, ["a", "b", None])
    layer = model[0]
    with torch.no_grad():
        # explicit, on one layer: beats the layer attribute and any context
        y = layer(x, adapter_ids=["b", None, "a"])
        lin = layer.base_layer(x)
        for row, n in enumerate(["b", None, "a"]):
            exp = lin[row] if n is None else layer(x[row:row + 1], adapter_ids=[n])[0]
            torch.testing.assert_close(y[row], exp, rtol=1e-6, atol=1e-6)
        with lorart.adapter_ids(model, ["a"] * 3):
            assert torch.equal(model(x), ref["a"])
            with lorart.adapter_ids(model, ["b"] * 3):      # nested: the inner one wins, then the outer returns
                assert torch.equal(model(x), ref["b"])
            assert torch.equal(model(x), ref["a"])
            with lorart.adapter_ids(model, None):            # None: no per-row selection (the active adapter)
                lorart.set_adapter(model, "b")
                torch.testing.assert_close(model(x), ref["b"], rtol=1e-5, atol=1e-5)
        # scoped to a sub-module: the rest of the model runs its active adapter
        lorart.set_adapter(model, "a")
        with lorart.adapter_ids(model[0], ["b"] * 3):
            mixed = model(x)
        layer.set_adapter("b")
        torch.testing.assert_close(mixed, model(x), rtol=1e-5, atol=1e-5)


def test_packed_rows_with_lengths_and_blocks_on_parts_of_a_model():
    model = with_adapters(("a", "b"))
    x = torch.randn(1, 6, 16)          # three requests packed in one row: 2, 3 and 1 tokens
    spans, names = [(0, 2), (2, 5), (5, 6)], ["a", None, "b"]
    with torch.no_grad():
        with lorart.adapter_ids(model, names, lengths=[2, 3, 1]):
            y = model(x)
        for (s, e), n in zip(spans, names):
            with lorart.adapter_ids(model, [n]):
                torch.testing.assert_close(y[:, s:e], model(x[:, s:e]), rtol=1e-6, atol=1e-6)
        # per token for the first layers, per request for the last one (as a serving step's lm_head on the last
        # token of each request): two blocks on two parts of the model
        with lorart.adapter_ids(model[:4], names, lengths=[2, 3, 1]), lorart.adapter_ids(model[4], names):
            h = model[:4](x)[:, [1, 4, 5]]
            out = model[4:](h[0])
        for i, ((s, e), n) in enumerate(zip(spans, names)):
            with lorart.adapter_ids(model, [n]):
                torch.testing.assert_close(out[i], model(x[:, s:e])[0, -1], rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="`lengths` cover 5 rows, the input has 6"):
            with lorart.adapter_ids(model, names, lengths=[2, 2, 1]):
                model(x)
        with pytest.raises(ValueError, match="argument `lengths`"):
            with lorart.adapter_ids(model, names, lengths=[2, 4]):
                pass


def test_adapter_ids_names_are_checked_against_the_whole_scope():
    model = tiny(2)
    lorart.inject(model, ["0"], r=2, alpha=2, dropout=0.0, adapter_name="only0")
    lorart.inject(model, ["0", "2"], r=2, alpha=2, dropout=0.0, adapter_name="both")
    x = torch.randn(2, 16)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        with lorart.adapter_ids(model, ["nope", None]):
            pass
    # an adapter some layers lack: those layers give its rows the base output (as PEFT's mixed batches)
    with torch.no_grad(), lorart.adapter_ids(model, ["only0", "only0"]):
        y = model(x)
    with torch.no_grad():
        lorart.set_adapter(model, "only0")
        assert model[2].active_adapter is None        # set_adapter: a layer without it runs its base
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


# ---- loading and injecting while other threads run --------------------------------------------------------------

def _save_adapters(tmp_path, names, n_layers=3):
    """Save one adapter per name (distinct random B) for `tiny(n_layers)`; return {name: (dir, state)}."""
    out = {}
    for i, name in enumerate(names):
        src = tiny(n_layers)
        lorart.inject(src, "all-linear", r=2 + i % 3, alpha=4, dropout=0.0, adapter_name=name)
        with torch.no_grad():
            for m in lora_layers(src).values():
                m.lora_B[name].weight.normal_(0, 0.1)
        d = str(tmp_path / name)
        lorart.save_adapter(src, d, adapter_name=name)
        out[name] = (d, lorart.adapters.adapter_state_dict(src, name))
    return out


@pytest.fixture
def fast_switching(monkeypatch):
    """Threads switch often, and adding an adapter to a layer gives the GIL away (as a real load does on
    a device copy): a check-then-change race shows up every time, not by luck."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    add = LoRALinear.add_adapter

    def slow_add(self, *a, **kw):
        time.sleep(0.001)
        return add(self, *a, **kw)

    monkeypatch.setattr(LoRALinear, "add_adapter", slow_add)
    yield
    sys.setswitchinterval(old)


def test_concurrent_load_adapter_keeps_every_adapter(tmp_path, fast_switching):
    names = [f"ad{i}" for i in range(8)]
    saved = _save_adapters(tmp_path, names)
    model = tiny()
    errors = run_threads([(lambda n=n: lorart.load_adapter(model, saved[n][0], name=n, activate=False))
                          for n in names])
    assert errors == []
    layers = lora_layers(model)
    assert sorted(layers) == lin_paths(tiny())
    for path, m in layers.items():
        assert sorted(m.adapter_names) == names, path
        for n in names:
            sd = saved[n][1]
            assert torch.equal(m.lora_A[n].weight, sd[f"base_model.model.{path}.lora_A.weight"])
            assert torch.equal(m.lora_B[n].weight, sd[f"base_model.model.{path}.lora_B.weight"])


def test_forwards_with_different_adapters_while_another_thread_loads(tmp_path):
    saved = _save_adapters(tmp_path, ["a", "b", "new"], n_layers=3)
    model = tiny()
    x = torch.randn(2, 16)
    lorart.load_adapter(model, saved["a"][0], name="a")
    lorart.load_adapter(model, saved["b"][0], name="b", activate=False)
    ref = reference_outputs(model, x, ["a", "b", None])
    stop = threading.Event()
    wrong: list = []
    count = [0]

    def forwards(name):
        def f():
            while not stop.is_set() or count[0] < 40:
                with torch.no_grad(), lorart.adapter_ids(model, [name] * 2):
                    y = model(x)
                count[0] += 1
                if not torch.equal(y, ref[name]):
                    wrong.append(name)
        return f

    def loader():
        time.sleep(0.01)
        lorart.load_adapter(model, saved["new"][0], name="new", activate=False)
        stop.set()

    assert run_threads([forwards("a"), forwards("b"), loader]) == []
    assert wrong == []
    with torch.no_grad(), lorart.adapter_ids(model, ["new", "a"]):
        y = model(x)
    other = tiny()
    lorart.load_adapter(other, saved["new"][0], name="new")
    with torch.no_grad():
        torch.testing.assert_close(y[0], other(x)[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y[1], ref["a"][1], rtol=1e-6, atol=1e-6)


def test_load_adapter_activate_false_leaves_the_model_output_alone(tmp_path):
    saved = _save_adapters(tmp_path, ["a", "wide"], n_layers=3)
    model = tiny()
    lorart.inject(model, ["0"], r=2, alpha=4, dropout=0.0, adapter_name="a")   # one layer has LoRA
    with torch.no_grad():
        model[0].lora_B["a"].weight.normal_()
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = model(x)
        lorart.load_adapter(model, saved["wide"][0], name="wide", activate=False)  # wraps layers 2 and 4 too
        assert torch.equal(model(x), before)


def test_concurrent_inject_of_different_adapters(fast_switching):
    model = tiny(4)
    names = [f"n{i}" for i in range(6)]
    errors = run_threads([(lambda n=n: lorart.inject(model, "all-linear", r=2, alpha=2, adapter_name=n))
                          for n in names])
    assert errors == []
    for m in lora_layers(model).values():
        assert sorted(m.adapter_names) == names


def test_inject_never_targets_the_linears_inside_lora_layers():
    model = tiny(2)
    lorart.inject(model, "all-linear", r=2, alpha=2, adapter_name="a")
    lorart.inject(model, "all-linear", r=2, alpha=2, adapter_name="b")
    lorart.inject(model, ["0", "a"], r=2, alpha=2, adapter_name="c")   # "a" names adapter a's A/B linears
    assert sorted(lora_layers(model)) == ["0", "2"]
    assert model[0].adapter_names == ["a", "b", "c"] and model[2].adapter_names == ["a", "b"]
    assert type(model[0].lora_A["a"]) is nn.Linear


# ---- all or nothing ------------------------------------------------------------------------------------------------

def snapshot(model):
    return {"modules": {n: m for n, m in model.named_modules()},
            "params": {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
            "lora": {n: (list(m.adapter_names), m.active_adapter) for n, m in lora_layers(model).items()}}


def assert_unchanged(model, snap):
    assert {n: m for n, m in model.named_modules()} == snap["modules"]
    params = dict(model.named_parameters())
    assert list(params) == list(snap["params"])
    for n, (p, val, rg) in snap["params"].items():
        assert params[n] is p and p.requires_grad == rg, n
        if not p.is_meta:
            torch.testing.assert_close(p, val, rtol=0, atol=0, equal_nan=True, msg=n)
    bufs = dict(model.named_buffers())
    assert list(bufs) == list(snap["buffers"])
    for n, (b, val) in snap["buffers"].items():
        assert bufs[n] is b and torch.equal(b, val), n
    assert {n: (list(m.adapter_names), m.active_adapter) for n, m in lora_layers(model).items()} == snap["lora"]


class Fault(RuntimeError):
    pass


def fail_on_call(monkeypatch, owner, attr, k: int):
    orig = getattr(owner, attr)
    calls = [0]

    def f(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise Fault(f"injected fault on call {k}")
        return orig(*a, **kw)

    monkeypatch.setattr(owner, attr, f)
    return calls


@pytest.mark.parametrize("train_bias", [False, True])
def test_inject_nf4_fault_on_the_fifth_layer_leaves_the_model_as_it_was(monkeypatch, train_bias):
    model = tiny(6)
    model[2].weight.requires_grad_(False)           # a mix of flags that inject would change
    model[4].bias.requires_grad_(False)
    snap = snapshot(model)
    calls = fail_on_call(monkeypatch, NF4Linear, "from_linear", 5)
    with pytest.raises(Fault):
        lorart.inject(model, "all-linear", r=2, alpha=4, quantize="nf4", train_bias=train_bias)
    assert calls[0] == 5
    assert_unchanged(model, snap)
    monkeypatch.undo()
    lorart.inject(model, "all-linear", r=2, alpha=4, quantize="nf4", train_bias=train_bias)   # and it still works
    assert all(isinstance(m.base_layer, NF4Linear) for m in lora_layers(model).values())


def test_inject_fault_adding_to_existing_lora_layers_rolls_back(monkeypatch):
    model = tiny(6)
    lorart.inject(model, "all-linear", r=2, alpha=4, adapter_name="first")
    lorart.set_adapter(model, "first")
    snap = snapshot(model)
    fail_on_call(monkeypatch, LoRALinear, "add_adapter", 5)
    with pytest.raises(Fault):
        lorart.inject(model, "all-linear", r=2, alpha=4, adapter_name="second")
    assert_unchanged(model, snap)


def test_load_adapter_fault_midway_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    saved = _save_adapters(tmp_path, ["x"], n_layers=6)
    model = tiny(6)
    lorart.inject(model, ["0", "2"], r=2, alpha=4, adapter_name="first")
    snap = snapshot(model)
    fail_on_call(monkeypatch, LoRALinear, "add_adapter", 5)
    with pytest.raises(Fault):
        lorart.load_adapter(model, saved["x"][0], name="x")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("train_bias", [False, True])
def test_inject_fault_keeps_the_flags_that_building_a_layer_changes(monkeypatch, quantize, train_bias):
    # LoRALinear sets its base's bias.requires_grad while it is built, before ModelEdit installs it: the undo
    # must restore the flag from before the edit (it restored the changed one: biases left frozen)
    from lorart.inject import ModelEdit
    model = tiny(6)
    model[4].bias.requires_grad_(False)
    snap = snapshot(model)
    calls = fail_on_call(monkeypatch, ModelEdit, "replace", 5)
    with pytest.raises(Fault):
        lorart.inject(model, "all-linear", r=2, alpha=4, quantize=quantize, train_bias=train_bias, freeze=False)
    assert calls[0] == 5
    assert_unchanged(model, snap)


def test_load_adapter_fault_while_wrapping_plain_linears_keeps_their_flags(tmp_path, monkeypatch):
    saved = _save_adapters(tmp_path, ["x"], n_layers=6)
    model = tiny(6)                      # plain linears, trainable biases: load_adapter wraps every one
    model[2].bias.requires_grad_(False)
    snap = snapshot(model)
    fail_on_call(monkeypatch, LoRALinear, "add_adapter", 5)
    with pytest.raises(Fault):
        lorart.load_adapter(model, saved["x"][0], name="x")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", ["meta", "float64", "nan"])
def test_inject_nf4_real_failure_on_the_fifth_layer_leaves_the_model_as_it_was(bad):
    model = tiny(6)
    if bad == "meta":     # a layer whose weights were never loaded: refused up front, naming it
        model[8] = nn.Linear(16, 16, device="meta")
    elif bad == "float64":
        model[8] = nn.Linear(16, 16, dtype=torch.float64)
    else:
        with torch.no_grad():
            model[8].weight[3, 3] = float("nan")
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="'8'" if bad == "meta" else "weight"):
        lorart.inject(model, "all-linear", r=2, alpha=4, quantize="nf4")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("trainable", [False, True])
def test_load_adapter_publishes_an_adapter_with_its_flags_set(tmp_path, monkeypatch, trainable):
    # what a forward in another thread can see the moment lora_A[name] appears: weights and requires_grad final
    saved = _save_adapters(tmp_path, ["x"])
    model = tiny(3)
    lorart.inject(model, "all-linear", r=2, alpha=4, adapter_name="first")
    seen = []
    setitem = nn.ModuleDict.__setitem__

    def spy(self, key, module):
        setitem(self, key, module)
        if key == "x":
            seen.append((module.weight.requires_grad, module.weight.detach().clone()))
    monkeypatch.setattr(nn.ModuleDict, "__setitem__", spy)
    lorart.load_adapter(model, saved["x"][0], name="x", trainable=trainable)
    state = saved["x"][1]
    assert len(seen) == 2 * len(lora_layers(model))
    assert all(rg == trainable for rg, _ in seen)
    assert sum(any(torch.equal(w, v) for v in state.values()) for _, w in seen) == len(seen)
