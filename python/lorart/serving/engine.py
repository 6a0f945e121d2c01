"""The engine: one thread owns the model and runs the step loop (continuous batching across adapters).

Each step: run queued commands (adapter load/unload), drop cancelled requests, admit waiting requests into the
running batch (up to `max_batch` requests, prompts up to `max_step_tokens` per step, loading their adapters
into the model on demand), then one packed forward over every running request (prompts of the new ones, one
token for the others, each row with its own adapter and KV cache), sample one token per request and send its
text to the request's sink. Finished requests leave; new ones join at the next step.

Other threads only call `submit`, `cancel`, `call`, `unload_adapter` and read state: the model is touched by
the engine thread alone, so no adapter selection is ever shared between threads.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import secrets
import threading
import time
import traceback
from typing import Callable

import torch

from ..models.generate import sample_next
from ..training.evaluate import autocast_ctx
from .batch import AdapterRows, PackedStep, SequenceCache, packed_forward
from .metrics import Metrics
from .registry import AdapterEntry, AdapterRegistry, UnknownModel
from .text import SamplingParams, TextStream

log = logging.getLogger("lorart.serve")


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queued: answer 429."""


class EngineClosed(RuntimeError):
    """The server is shutting down: answer 503."""


class PromptTooLong(ValueError):
    """Prompt + max_tokens over the context length: answer 400."""


class Request:
    """One generation request. The engine calls ``sink(kind, data)`` from its thread: ("delta", text) while
    streaming, then once ("done", result dict) or ("error", message)."""

    def __init__(self, prompt: list[int], params: SamplingParams, model: str, adapter: AdapterEntry | None,
                 sink: Callable, stream: bool, tokenizer):
        self.prompt = prompt
        self.params = params
        self.model = model
        self.adapter = adapter
        self.sink = sink
        self.stream = stream
        self.text = TextStream(tokenizer, params.stop)
        self.output_ids: list[int] = []
        self.cache: SequenceCache | None = None
        self.generator: torch.Generator | None = None
        self.cancelled = False
        self.done = False
        self.pinned = False  # counted in adapter.running
        self.t_arrival = time.monotonic()
        self.t_admitted = self.t_first = None


class Engine:
    def __init__(self, model, tokenizer, *, base_name: str, max_batch: int = 16, max_queued: int = 64,
                 max_step_tokens: int = 512, max_adapters: int = 8, max_model_len: int | None = None,
                 metrics: Metrics | None = None):
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(getattr(model, "model", None), "layers"):
            raise TypeError("lorart: serve: expected a lorart Llama model (lorart.models.load_model)")
        if getattr(cfg, "sliding_window", None) is not None:
            raise ValueError("lorart: serve: models with sliding-window attention are not supported yet")
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queued", max_queued, 0),
                            ("max_step_tokens", max_step_tokens, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"lorart: serve: {name}: expected an integer >= {lo}, got {v!r}")
        limit = int(cfg.max_position_embeddings)
        if max_model_len is not None:
            if not isinstance(max_model_len, int) or not 2 <= max_model_len <= limit:
                raise ValueError(f"lorart: serve: max_model_len: expected an integer in [2, {limit}] (the "
                                 f"model's context), got {max_model_len!r}")
            limit = max_model_len
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch, self.max_queued, self.max_step_tokens = max_batch, max_queued, max_step_tokens
        self.max_model_len = limit
        self.eos_ids = set(tokenizer.eos_ids or [])
        self.metrics = metrics or Metrics()
        self.rows = AdapterRows(model)
        self.registry = AdapterRegistry(model, max_adapters, base_name, on_change=self._adapters_changed)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._commands: collections.deque = collections.deque()
        self._unloads: list[tuple[AdapterEntry, concurrent.futures.Future]] = []
        self._thread: threading.Thread | None = None
        self._closing = False   # refuse new requests (draining)
        self._stop = False      # leave the loop
        self.steps = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="lorart-engine", daemon=True)
        self._thread.start()
        return self

    def drain(self) -> None:
        """Refuse new requests (EngineClosed); accepted ones run to the end."""
        with self._cv:
            self._closing = True

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; requests still queued or running end with an error."""
        with self._cv:
            self._closing = self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def load_info(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._running)}

    # ---- any thread ---------------------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams, model: str | None, sinks: list[Callable],
               stream: bool = False) -> list[Request]:
        """Queue one request per prompt (all or none). Raises UnknownModel, PromptTooLong, QueueFull or
        EngineClosed."""
        name = model or self.base_name
        for p in prompts:
            if not p:
                raise PromptTooLong("the prompt is empty (it must have at least one token)")
            if len(p) + params.max_tokens > self.max_model_len:
                raise PromptTooLong(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{len(p) + params.max_tokens} tokens ({len(p)} in the prompt, {params.max_tokens} in the "
                    "completion). Please reduce the length of the prompt or completion.")
        entries = []
        try:
            if name != self.base_name:
                entries = [self.registry.acquire(name) for _ in prompts]
            reqs = [Request(list(p), params, name, entries[i] if entries else None, s, stream, self.tokenizer)
                    for i, (p, s) in enumerate(zip(prompts, sinks))]
            with self._cv:
                if self._closing:
                    raise EngineClosed("the server is shutting down")
                if len(self._waiting) + len(reqs) > self.max_queued:
                    self.metrics.rejected.labels("queue_full").inc()
                    raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting (--max-queued "
                                    f"{self.max_queued}); retry later")
                self._waiting.extend(reqs)
                self.metrics.queue_depth.set(len(self._waiting))
                self._cv.notify_all()
            return reqs
        except BaseException:
            for e in entries:
                self.registry.release(e)
            raise

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away); it leaves at the next step."""
        if not req.done:
            req.cancelled = True
            with self._cv:
                self._cv.notify_all()

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run `fn()` in the engine thread between two steps; its result or exception lands in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop:
                raise EngineClosed("the server is shutting down")
            self._commands.append((fn, fut))
            self._cv.notify_all()
        return fut

    def load_adapter(self, name: str, path: str) -> concurrent.futures.Future:
        return self.call(lambda: self.registry.add(name, path))

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """New requests for `name` are refused at once (UnknownModel); the future resolves once the requests
        already accepted for it have finished and it is gone from the model."""
        entry = self.registry.mark_unloading(name)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._unloads.append((entry, fut))
            self._cv.notify_all()
        return fut

    # ---- the engine thread --------------------------------------------------------------------------------------
    def _adapters_changed(self, kind: str) -> None:
        self.rows.refresh()
        self.metrics.adapters_resident.set(self.registry.resident_count)
        (self.metrics.adapter_loads if kind == "load" else self.metrics.adapter_evictions).inc()

    def _run(self) -> None:
        try:
            with torch.no_grad(), autocast_ctx(self.model.device, self.model.dtype):
                while self._iteration():
                    pass
        except BaseException:  # a bug: fail every request rather than hang them
            log.error("lorart serve: the engine stopped:\n%s", traceback.format_exc())
        finally:
            with self._cv:
                self._stop = self._closing = True
                left = list(self._waiting) + self._running
                self._waiting.clear()
                self._running = []
                commands, self._commands = list(self._commands), collections.deque()
                unloads, self._unloads = self._unloads, []
            for r in left:
                self._finish(r, "error", error="the server is shutting down")
            for _, fut in commands:
                fut.set_exception(EngineClosed("the server is shutting down"))
            for _, fut in unloads:
                fut.set_exception(EngineClosed("the server is shutting down"))

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._commands
                    or any(e.refs == 0 for e, _ in self._unloads))

    def _iteration(self) -> bool:
        with self._cv:
            while not (self._stop or self._has_work()):
                self._cv.wait()
            if self._stop:
                return False
            commands, self._commands = list(self._commands), collections.deque()
        for fn, fut in commands:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001  (handed to the caller)
                    fut.set_exception(e)
        self._reap_cancelled()
        self._finish_unloads()
        admitted = self._admit()
        self.metrics.running.set(len(self._running))
        if self._running:
            self._step()
        elif self._waiting and not admitted and not self._commands:
            with self._cv:  # nothing can run now (should not happen: an idle model evicts anything)
                self._cv.wait(0.05)
        return True

    def _reap_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            if gone:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        gone += [r for r in self._running if r.cancelled]
        if gone:
            self._running = [r for r in self._running if not r.cancelled]
            for r in gone:
                self._finish(r, "cancelled")

    def _finish_unloads(self) -> None:
        keep = []
        for entry, fut in self._unloads:
            if entry.refs == 0:
                try:
                    self.registry.remove(entry)
                    fut.set_result(entry.name)
                except BaseException as e:  # noqa: BLE001
                    fut.set_exception(e)
            else:
                keep.append((entry, fut))
        self._unloads = keep

    def _admit(self) -> int:
        budget, admitted = self.max_step_tokens, 0
        with self._cv:
            candidates = list(self._waiting)
        taken = set()
        blocked = False  # an earlier request waits for an adapter slot
        for r in candidates:
            if len(self._running) >= self.max_batch or (admitted and len(r.prompt) > budget):
                break
            if r.cancelled:
                continue
            if r.adapter is not None:
                if blocked:  # later adapter requests would keep the loaded adapters pinned: they wait their turn
                    continue
                try:
                    if not self.registry.ensure_resident(r.adapter):
                        blocked = True  # every loaded adapter is busy: wait for a slot; base requests still pass
                        continue
                except Exception as e:  # the folder changed or vanished since it was registered
                    taken.add(id(r))
                    self._finish(r, "error", error=f"adapter '{r.model}' could not be loaded: {e}")
                    continue
                with self.registry.lock:
                    r.adapter.running += 1
                r.pinned = True
            r.cache = SequenceCache(self.model.config.num_hidden_layers, len(r.prompt) + r.params.max_tokens)
            if not r.params.greedy:
                seed = r.params.seed if r.params.seed is not None else secrets.randbits(63)
                r.generator = torch.Generator(device=self.model.device).manual_seed(seed % (1 << 64))
            r.t_admitted = time.monotonic()
            self.metrics.queue_time.observe(r.t_admitted - r.t_arrival)
            self._running.append(r)
            taken.add(id(r))
            budget -= len(r.prompt)
            admitted += 1
        if taken:
            with self._cv:
                self._waiting = collections.deque(r for r in self._waiting if id(r) not in taken)
                self.metrics.queue_depth.set(len(self._waiting))
        return admitted

    def _step(self) -> None:
        seqs = self._running
        toks, pos, lens = [], [], []
        for r in seqs:
            n = r.cache.length
            if n == 0:
                toks += r.prompt
                pos += range(len(r.prompt))
                lens.append(len(r.prompt))
            else:
                toks.append(r.output_ids[-1])
                pos.append(n)
                lens.append(1)
        dev = self.model.device
        last = torch.tensor(lens).cumsum(0).sub_(1).to(dev)
        t0 = time.perf_counter()
        try:
            self.rows.bind([r.adapter.key if r.adapter else None for r in seqs], lens)
            try:
                logits = packed_forward(self.model, torch.tensor(toks, device=dev), torch.tensor(pos, device=dev),
                                        PackedStep([r.cache for r in seqs], lens), last)
            finally:
                self.rows.clear()
            for r, n in zip(seqs, lens):
                r.cache.advance(n)
            nxt = self._greedy(seqs, logits)
        except Exception as e:  # noqa: BLE001  (fail this batch, keep serving)
            log.error("lorart serve: a forward step failed:\n%s", traceback.format_exc())
            for r in seqs:
                self._finish(r, "error", error=f"internal error in the forward step: {type(e).__name__}: {e}")
            self._running = []
            return
        self.steps += 1
        m = self.metrics
        m.step_seconds.observe(time.perf_counter() - t0)
        m.batch_size.observe(len(seqs))
        m.step_tokens.observe(len(toks))
        for i, (r, n, t) in enumerate(zip(seqs, lens, nxt)):
            if r.cache.length == n:  # its first step: the prompt
                m.prompt_tokens.labels(r.model).inc(len(r.prompt))
            if t is None:  # sampled on its own: a failure there fails this request only
                try:
                    t = int(sample_next(logits[i:i + 1], r.params.temperature, r.params.top_p, r.generator)[0])
                except Exception as e:  # noqa: BLE001
                    self._finish(r, "error", error=f"sampling failed: {type(e).__name__}: {e}")
                    continue
            self._emit(r, t)
        self._running = [r for r in seqs if not r.done]

    @staticmethod
    def _greedy(seqs: list[Request], logits: torch.Tensor) -> list:
        """The argmax of the greedy rows (one call for all of them); None for the sampled rows."""
        out: list = [None] * len(seqs)
        greedy = [i for i, r in enumerate(seqs) if r.generator is None]
        if greedy:
            sel = logits if len(greedy) == len(seqs) else logits[greedy]
            for i, t in zip(greedy, sel.argmax(-1).tolist()):
                out[i] = t
        return out

    def _emit(self, r: Request, token: int) -> None:
        now = time.monotonic()
        if r.t_first is None:
            r.t_first = now
            self.metrics.ttft.labels(r.model).observe(now - r.t_arrival)
        r.output_ids.append(token)
        self.metrics.generation_tokens.labels(r.model).inc()
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        elif r.text.push(token) is not None:
            finish = "stop"
        elif len(r.output_ids) >= r.params.max_tokens:
            finish = "length"
        if finish is not None:
            r.text.finish()
        if r.stream:
            delta = r.text.release(final=finish is not None)
            if delta:
                self._send(r, "delta", delta)
        if finish is not None:
            self._finish(r, finish)

    def _send(self, r: Request, kind: str, data) -> None:
        try:
            r.sink(kind, data)
        except Exception:  # noqa: BLE001  (the receiving side is gone: nobody waits for this request)
            r.cancelled = True

    def _finish(self, r: Request, outcome: str, error: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        r.cache = None
        if r.adapter is not None:
            with self.registry.lock:
                r.adapter.running -= r.pinned
                r.adapter.refs -= 1
        self.metrics.requests.labels(r.model, outcome).inc()
        if r.t_first is not None:
            self.metrics.latency.labels(r.model).observe(time.monotonic() - r.t_arrival)
        if outcome == "error":
            self._send(r, "error", error)
        elif outcome != "cancelled":
            self._send(r, "done", {"text": r.text.text, "finish_reason": outcome, "stop_reason": r.text.stopped,
                                   "prompt_tokens": len(r.prompt), "completion_tokens": len(r.output_ids)})


__all__ = ["Engine", "Request", "QueueFull", "EngineClosed", "PromptTooLong", "UnknownModel"]
