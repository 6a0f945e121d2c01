"""lorart.serving: one base model, many LoRA adapters, one OpenAI-compatible HTTP server (`lorart serve`).

    engine = Engine(model, tokenizer, base_name="base").start()      # the step loop (continuous batching)
    engine.registry.add("tenant-a", "out/adapter")                     # before start(), or engine.load_adapter()
    app = create_app(engine)                                           # ASGI app (FastAPI); run it with uvicorn

Layers: `batch` (packed forward, per-request KV caches, per-row adapters), `engine` (the scheduler thread that
owns the model), `registry` (adapter lifecycle, LRU), `text` (sampling params, detokenization, stop strings),
`protocol` + `api` (HTTP), `metrics` (Prometheus), `cli`. Needs the `serve` extra: pip install "lorart[serve]".
"""
from __future__ import annotations

_EXPORTS = {"Engine": ".engine", "create_app": ".api", "SamplingParams": ".text", "Metrics": ".metrics"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'lorart.serving' has no attribute {name!r}")


__all__ = list(_EXPORTS)
