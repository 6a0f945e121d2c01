"""The HTTP layer: a FastAPI app over an Engine, OpenAI-compatible as vLLM's server is for LoRA.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions ("stream": true gives server-sent events), and with adapter loading allowed
POST /v1/load_lora_adapter and /v1/unload_lora_adapter. Every error answers {"error": {"message", "type",
"param", "code"}}. With an API key every route needs ``Authorization: Bearer <key>``.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..adapters import AdapterFileError
from .engine import Engine, EngineClosed, PromptTooLong, QueueFull
from .metrics import CONTENT_TYPE_LATEST
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, LoadLoRARequest, UnloadLoRARequest,
                       chat_body, chat_chunk, completion_body, completion_chunk, model_card, new_id, usage,
                       usage_chunk)
from .registry import AdapterConflict, UnknownModel

MAX_BODY_BYTES = 16 << 20
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class _Guard:
    """ASGI middleware in front of every route: the API key, and a bound on the request body's size."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app = app
        self.key = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and not secrets.compare_digest(headers.get(b"authorization", b""), self.key):
            err = APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'")
            return await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            err = APIError(413, f"the request body is over {self.max_body} bytes")
            return await JSONResponse(err.body(), 413)(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read the body here, within the bound, then hand it on
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.max_body:
                err = APIError(413, f"the request body is over {self.max_body} bytes")
                return await JSONResponse(err.body(), 413)(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal first
            if first is not None:
                msg, first = first, None
                return msg
            return await receive()

        return await self.app(scope, replay, send)


class _Events:
    """Engine thread -> event loop: each request's sink puts (index, kind, data) into one asyncio queue."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int):
        put = self.queue.put_nowait
        return lambda kind, data: self.loop.call_soon_threadsafe(put, (index, kind, data))


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read already, so receive() waits for that)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, *, model_path: str | None = None, api_key: str | None = None,
               allow_adapter_loading: bool = False, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="lorart serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    base = engine.base_name

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}").body(),
                                400)
        if not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
            return JSONResponse(APIError(400, "the request body must be a JSON object").body(), 400)
        param = loc[0] if loc else None  # the top-level field (inner locations name union members)
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:5]) or "invalid request"
        return JSONResponse(APIError(400, msg, param).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), 500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is not running")
        return JSONResponse({"status": "ok", **engine.load_info()})

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        cards = [model_card(base, model_path, None, engine.max_model_len)]
        cards += [model_card(n, p, base, engine.max_model_len) for n, p in engine.registry.names()]
        return {"object": "list", "data": cards}

    def _submit(prompts, params, model, stream):
        events = _Events()
        try:
            reqs = engine.submit(prompts, params, model, [events.sink(i) for i in range(len(prompts))], stream)
        except UnknownModel:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "NotFoundError") from None
        except PromptTooLong as e:
            raise APIError(400, str(e), "prompt") from None
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        except EngineClosed as e:
            raise APIError(503, str(e)) from None
        return reqs, events

    async def _gather(request: Request, reqs, events: _Events) -> list[dict] | None:
        results = [None] * len(reqs)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            pending = len(reqs)
            while pending:
                get = asyncio.ensure_future(events.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return None  # the client went away: the finally clause cancels its requests
                i, kind, data = get.result()
                if kind == "error":
                    raise APIError(500, data)
                if kind == "done":
                    results[i] = data
                    pending -= 1
            return results
        finally:
            gone.cancel()
            for r in reqs:
                engine.cancel(r)

    async def _stream(reqs, events: _Events, chunk, first=None, include_usage=False, obj="text_completion"):
        rid, created, name = new_id("cmpl" if obj == "text_completion" else "chatcmpl"), int(time.time()), \
            reqs[0].model
        try:
            if first is not None:
                yield _sse(chunk(rid, created, name, 0, first))
            pending, p_tok, c_tok = len(reqs), 0, 0
            while pending:
                i, kind, data = await events.queue.get()
                if kind == "delta":
                    yield _sse(chunk(rid, created, name, i, data))
                elif kind == "done":
                    pending -= 1
                    p_tok += data["prompt_tokens"]
                    c_tok += data["completion_tokens"]
                    yield _sse(chunk(rid, created, name, i, None, data["finish_reason"], data["stop_reason"]))
                else:
                    yield _sse(APIError(500, data).body())
                    break
            else:
                if include_usage:
                    yield _sse(usage_chunk(rid, created, name, obj, usage(p_tok, c_tok)))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (Starlette cancels the stream)
            for r in reqs:
                engine.cancel(r)

    def _completion_chunk(rid, created, name, i, text, finish=None, stop_reason=None):
        return completion_chunk(rid, created, name, i, text or "", finish, stop_reason)

    def _chat_chunk(rid, created, name, i, text, finish=None, stop_reason=None):
        if isinstance(text, dict):
            return chat_chunk(rid, created, name, text)
        return chat_chunk(rid, created, name, {} if text is None else {"content": text}, finish, stop_reason)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        prompts = await run_in_threadpool(body.prompts, engine.tokenizer)  # a long prompt must not block the loop
        params = body.sampling(COMPLETION_DEFAULT_MAX_TOKENS)
        reqs, events = _submit(prompts, params, body.model, body.stream)
        if body.stream:
            return StreamingResponse(_stream(reqs, events, _completion_chunk, include_usage=body.include_usage),
                                     media_type="text/event-stream")
        results = await _gather(request, reqs, events)
        if results is None:
            return Response(status_code=499)
        return completion_body(new_id("cmpl"), int(time.time()), reqs[0].model, results)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.check()
        ids = await run_in_threadpool(body.prompt_ids, engine.tokenizer)
        params = body.chat_sampling(max(1, engine.max_model_len - len(ids)))
        reqs, events = _submit([ids], params, body.model, body.stream)
        if body.stream:
            return StreamingResponse(_stream(reqs, events, _chat_chunk, {"role": "assistant", "content": ""},
                                             body.include_usage, "chat.completion.chunk"),
                                     media_type="text/event-stream")
        results = await _gather(request, reqs, events)
        if results is None:
            return Response(status_code=499)
        return chat_body(new_id("chatcmpl"), int(time.time()), reqs[0].model, results[0])

    if allow_adapter_loading:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRARequest):
            try:
                await asyncio.wrap_future(engine.load_adapter(body.lora_name, body.lora_path))
            except (AdapterConflict, AdapterFileError, FileNotFoundError, ValueError, KeyError, TypeError) as e:
                msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                raise APIError(400, msg, "lora_path" if not isinstance(e, AdapterConflict) else "lora_name") from None
            except EngineClosed as e:
                raise APIError(503, str(e)) from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRARequest):
            try:
                fut = engine.unload_adapter(body.lora_name)
            except UnknownModel:
                raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "lora_name") from None
            try:
                await asyncio.shield(asyncio.wrap_future(fut))
            except EngineClosed as e:
                raise APIError(503, str(e)) from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return _Guard(app, api_key, max_body_bytes)
