"""OpenAI request shapes (what we accept) and response shapes (what we send back).

Fields we cannot honour exactly (n > 1, penalties, logit_bias, ...) are
refused with a 400 naming the field, rather than silently ignored: the output is
supposed to be exactly the model's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SpecrayOptions(BaseModel):
    """The `specray` extension object a request may carry (openai: `extra_body`)."""

    model_config = ConfigDict(extra="forbid")
    speculative: bool = True  # False: the target alone (same output, for comparison)
    # this request's deadline in seconds from arrival (capped by the server's request_timeout_s):
    # past it the request is cancelled, its KV freed, and the answer is a 504
    timeout_s: float | None = Field(None, gt=0)


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_STOP_CHARS = 512  # per stop string: a partial match is re-checked at every token, so bound it


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked in `unsupported`

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: decode to max_tokens past end-of-sequence (load tests send it)
    specray: SpecrayOptions = Field(default_factory=SpecrayOptions)

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings may have at most {MAX_STOP_CHARS} characters, got "
                             f"{max(len(s) for s in stops)}")
        return stops

    def unsupported(self) -> str | None:
        """The first field set to something we would have to ignore, if any."""
        if self.n != 1:
            return "n"
        neutral = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "best_of": 1, "echo": False,
                   "suffix": None, "tools": None,
                   "tool_choice": None, "response_format": None}
        for name, value in (self.model_extra or {}).items():
            if name not in neutral:
                return name
            if value not in (neutral[name], None, False):
                return name
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # the chosen token's and this many alternatives

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_completion(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:  # 0 would read as "not given" and fall back to the default
            raise ValueError(f"max_completion_tokens must be at least 1, got {v}")
        return v

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class APIError(Exception):
    """An error the client caused (or a state it must wait out), OpenAI-shaped."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_body(entries: list[tuple[str, float, list[tuple[str, float]]]] | None, chat: bool,
                  offset: int = 0) -> dict | None:
    """OpenAI's logprobs object from (token text, logprob, [(alternative, logprob)])."""
    if entries is None:
        return None
    if chat:
        def item(tok: str, lp: float) -> dict:
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

        return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]}
                            for t, lp, top in entries]}
    offsets, at = [], offset
    for t, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}


def completion_body(rid: str, model: str, text: str | None, finish: str | None, chat: bool,
                    first: bool = False, stream: bool = False, logprobs: dict | None = None) -> dict:
    """One response (stream=False) or one SSE chunk (stream=True)."""
    if chat:
        if stream:
            delta: dict = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish}
        obj = "chat.completion.chunk" if stream else "chat.completion"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def request_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its definitions inlined: the OpenAPI document describes the
    body of each POST route (the routes read the raw body themselves, to bound and time it)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def openapi_body(model: type[BaseModel]) -> dict:
    """FastAPI's `openapi_extra` for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(model)}}}}
