"""OpenAI request bodies (pydantic) and the response / chunk / error bodies, as vLLM's OpenAI server has them.

Unknown fields are accepted and ignored (as OpenAI and vLLM do); fields whose meaning lorart serve does not
implement (n > 1, logprobs, echo, penalties, tools, ...) are refused with a 400 naming the field, rather than
silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .text import SamplingParams

MAX_PROMPTS = 64   # prompts in one /v1/completions request
MAX_STOPS = 16



def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {type(v).__name__}")
    return float(v)


Number = Annotated[float, BeforeValidator(_number)]  # JSON numbers only (no strings, no booleans)


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""
    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
             413: "RequestTooLarge", 429: "RateLimitError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None):
        message = message.removeprefix("lorart: ")
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or self.TYPES.get(status, "BadRequestError")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None
    n: StrictInt = 1
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[StrictStr] = None

    def _refuse_unsupported(self, extra: dict) -> None:
        if self.n != 1:
            raise APIError(400, f"n: only n = 1 is supported, got {self.n}", "n")
        for k in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, k)
            if v not in (None, 0, 0.0):
                raise APIError(400, f"{k}: not supported by lorart serve (expected 0 or absent), got {v}", k)
        if self.logit_bias:
            raise APIError(400, "logit_bias: not supported by lorart serve", "logit_bias")
        for k, ok in extra.items():
            v = getattr(self, k, None) if k in type(self).model_fields else (self.model_extra or {}).get(k)
            if v is not None and not ok(v):
                raise APIError(400, f"{k}: not supported by lorart serve, got {v!r}", k)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream = true", "stream_options")

    def sampling(self, default_max_tokens: int, max_tokens: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOPS:
            raise APIError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stop)}", "stop")
        mt = self.max_tokens if max_tokens is None else max_tokens
        try:
            return SamplingParams(max_tokens=default_max_tokens if mt is None else mt,
                                  temperature=1.0 if self.temperature is None else float(self.temperature),
                                  top_p=1.0 if self.top_p is None else float(self.top_p), stop=tuple(stop),
                                  seed=self.seed)
        except ValueError as e:
            param = str(e).split(":", 1)[0]
            raise APIError(400, str(e), param) from None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Req):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    echo: Optional[StrictBool] = None
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None

    def check(self) -> None:
        self._refuse_unsupported({"echo": lambda v: v is False, "logprobs": lambda v: False,
                                  "best_of": lambda v: v == 1, "suffix": lambda v: False})

    def prompts(self, tokenizer) -> list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            items = [p]
        elif not p:
            raise APIError(400, "prompt: expected a string, a list of strings or token ids, got an empty list",
                           "prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        if len(items) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(items)}", "prompt")
        vocab = tokenizer.vocab_size
        out = []
        for it in items:
            ids = tokenizer.encode(it) if isinstance(it, str) else list(it)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}",
                               "prompt")
            out.append(ids)
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: Optional[Union[StrictStr, list[TextPart]]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    def check(self) -> None:
        self._refuse_unsupported({"logprobs": lambda v: v is False, "top_logprobs": lambda v: False,
                                  "tools": lambda v: not v,
                                  "response_format": lambda v: v.get("type") == "text"})

    def chat_sampling(self, default_max_tokens: int) -> SamplingParams:
        mt = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(default_max_tokens, mt)

    def prompt_ids(self, tokenizer) -> list[int]:
        if tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in self.messages]
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001  (a template error: raise_exception(...) on a bad conversation)
            raise APIError(400, f"messages: the chat template refused them: {e}", "messages") from None


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: StrictStr


# ---- responses ----------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, results: list[dict]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"],
                         "stop_reason": r["stop_reason"]} for i, r in enumerate(results)],
            "usage": usage(sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results))}


def chat_body(rid: str, created: int, model: str, r: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                         "finish_reason": r["finish_reason"], "stop_reason": r["stop_reason"]}],
            "usage": usage(r["prompt_tokens"], r["completion_tokens"])}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish: str | None = None,
                     stop_reason=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                         "stop_reason": stop_reason}]}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None, stop_reason=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                         "stop_reason": stop_reason}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, u: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def model_card(name: str, root: str | None, parent: str | None, max_model_len: int | None) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lorart", "root": root,
            "parent": parent, "max_model_len": max_model_len, "permission": []}
