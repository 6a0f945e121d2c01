"""A lorart server on loopback for tests: the tiny model, two LoRA adapters with different targets (the `tiny`
fixture), the engine on them, uvicorn in a thread (127.0.0.1, a free port), and the single-request references the
server must reproduce; Paused, wait_until and metric_value for the engine's timing and counters."""
from __future__ import annotations

import functools
import os
import socket
import threading
import time

import pytest
import torch

import lorart
from lorart.models import generate, load_model
from lorart.serving.engine import Engine
from train_helpers import tiny_folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on 2 cores shared with the HTTP threads: one intra-op thread avoids OpenMP spin contention
    (measured 30x slower references with 2 threads under load). Autouse in every module that imports it."""
    n, k = torch.get_num_threads(), lorart.get_num_threads()
    torch.set_num_threads(1)
    lorart.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    lorart.set_num_threads(k)


ADAPTERS = {"alpha": ["q_proj", "v_proj"], "beta": "all-linear"}  # different targets: per-layer adapter lists differ


def make_adapters(model_dir: str, out: str, seeds=(1, 2), names=None, scale: float = 0.3) -> dict[str, str]:
    """Random (non-trivial: A and B ~ N(0, scale)) LoRA adapters for the model `model_dir` (a folder or
    "default"), saved in PEFT format."""
    paths = {}
    for (name, targets), seed in zip((names or ADAPTERS).items(), seeds):
        m, _ = load_model(model_dir)
        lorart.inject(m, targets=targets, r=4, alpha=8, dropout=0.0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        paths[name] = lorart.save_adapter(m, os.path.join(out, name))
        del m
    return paths


def tiny_setup(tmp) -> tuple[str, dict[str, str]]:
    model_dir = tiny_folder(os.path.join(tmp, "model"))
    return model_dir, make_adapters(model_dir, os.path.join(tmp, "adapters"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, {adapter name: folder}) of tiny_setup, once per test module that imports it."""
    return tiny_setup(str(tmp_path_factory.mktemp("serve")))


def make_engine(model_dir, adapters, quantize=False, **kw):
    """An Engine (not started) on `model_dir` (NF4 with `quantize`) with `adapters` registered; (engine, tokenizer)."""
    m, tok = load_model(model_dir, quantize="nf4" if quantize else None)
    eng = Engine(m, tok, base_name="tiny", **kw)
    for name, path in adapters.items():
        eng.registry.add(name, path)
    return eng, tok


@functools.lru_cache(maxsize=16)
def reference_model(model_dir: str, adapter: str | None, quantize: bool = False):
    """The model `lorart generate --model model_dir --adapter adapter` runs (cached: never modify it)."""
    m, tok = load_model(model_dir, quantize="nf4" if quantize else None)
    if adapter is not None:
        lorart.load_adapter(m, adapter)
    return m.eval(), tok


def reference(model_dir: str, adapter: str | None, prompt_ids: list[int], max_tokens: int, quantize=False) -> list[int]:
    """What `lorart generate --adapter` computes for one prompt (greedy): the generated token ids, EOS dropped."""
    m, tok = reference_model(model_dir, adapter, quantize)
    out = generate(m, [prompt_ids], max_new_tokens=max_tokens, eos_token_id=tok.eos_ids or None,
                   pad_token_id=tok.pad_id)
    ids = out[0, len(prompt_ids):].tolist()
    eos = set(tok.eos_ids or [])
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def reference_text(model_dir, adapter, prompt_ids, max_tokens, quantize=False) -> str:
    _, tok = reference_model(model_dir, adapter, quantize)
    return tok.decode(reference(model_dir, adapter, prompt_ids, max_tokens, quantize), skip_special_tokens=True)


class Server:
    """`create_app(engine)` served by uvicorn in a background thread on 127.0.0.1 (a free port)."""

    def __init__(self, engine, **app_kw):
        import uvicorn

        from lorart.serving.api import create_app

        self.engine = engine.start()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, **app_kw), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def client(self, **kw):
        import openai
        kw.setdefault("api_key", "none")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Paused:
    """Hold the engine thread between two steps (requests queue up meanwhile)."""

    def __init__(self, engine):
        self.go = threading.Event()
        self.engine = engine

    def __enter__(self):
        entered = threading.Event()
        self.engine.call(lambda: (entered.set(), self.go.wait(60)))
        assert entered.wait(30)
        return self

    def __exit__(self, *exc):
        self.go.set()


def wait_until(pred, timeout=30.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


def metric_value(engine, name, **labels):
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0
