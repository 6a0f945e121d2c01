"""Prometheus metrics of a server (prometheus_client, one registry per server, text format at GET /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the HTTP layer)

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorart_requests", "Finished requests by model and outcome "
                                "(stop, length, cancelled, error)", ["model", "outcome"], registry=r)
        self.rejected = Counter("lorart_requests_rejected", "Requests refused before queueing, by reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("lorart_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("lorart_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.queue_depth = Gauge("lorart_queue_depth", "Requests waiting for a slot in the running batch",
                                 registry=r)
        self.running = Gauge("lorart_running_requests", "Requests in the running batch", registry=r)
        self.adapters_resident = Gauge("lorart_adapters_resident", "Adapters loaded into the model", registry=r)
        self.adapter_loads = Counter("lorart_adapter_loads", "Adapter loads into the model (including reloads "
                                     "after eviction)", registry=r)
        self.adapter_evictions = Counter("lorart_adapter_evictions", "Adapters evicted from the model (LRU)",
                                         registry=r)
        self.batch_size = Histogram("lorart_batch_size", "Requests per forward step", buckets=_BATCH, registry=r)
        self.step_tokens = Histogram("lorart_step_tokens", "Tokens per forward step (prompts + one per decoding "
                                     "request)", buckets=_BATCH + (512, 1024, 2048, 4096), registry=r)
        self.step_seconds = Histogram("lorart_step_seconds", "Time of one forward step", buckets=_STEP, registry=r)
        self.latency = Histogram("lorart_request_latency_seconds", "Request time from arrival to its last token",
                                 ["model"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("lorart_time_to_first_token_seconds", "Time from arrival to the first token",
                              ["model"], buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("lorart_queue_time_seconds", "Time waiting before joining the running batch",
                                    buckets=_LATENCY, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
