"""A request checked in full before it takes a place: API key, body size and upload time,
JSON, fields, model name, prompt length (tokenized on a worker thread).

Kept apart from the routes so that everything here can refuse a request without holding
an admission slot or touching the decoder: a request refused here costs the replica one
read of its body and nothing else, however many arrive.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from pydantic import ValidationError

from cluster.serve.backend import Backend
from cluster.serve.config import ServeArgs
from cluster.serve.openai_api import APIError, ChatCompletionRequest, CompletionRequest
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams


class Intake:
    def __init__(self, args: ServeArgs, backend: Backend, model: str, api_key: str | None):
        self.args, self.backend, self.model, self.api_key = args, backend, model, api_key
        self.tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.reading = 0  # requests sending their body right now (`max_reading`)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: send Authorization: Bearer <key>",
                           "invalid_request_error", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model}`",
                           param="model", code="model_not_found")

    async def read_body(self, request: Request) -> bytes:
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body has {declared} bytes; this endpoint takes at most {limit} bytes",
                           code="request_too_large")
        if self.reading >= self.args.max_reading:
            raise APIError(503, f"{self.reading} requests are already sending their body to this replica; retry",
                           "server_overloaded", code="too_many_uploads", headers={"Retry-After": "1"})

        async def receive() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the request body exceeds this endpoint's limit of {limit} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
            return b"".join(chunks)

        self.reading += 1
        try:
            return await asyncio.wait_for(receive(), self.args.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.args.body_timeout_s:g} s "
                                "(body_timeout_s)", code="request_timeout") from None
        finally:
            self.reading -= 1

    async def parse(self, request: Request, chat: bool):
        """(the request's fields, its prompt's token ids, how to decode it, top logprobs wanted)."""
        raw = await self.read_body(request)
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise APIError(400, "the request body nests JSON too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        if chat and isinstance(data.get("messages"), list) and len(data["messages"]) > self.args.max_messages:
            raise APIError(400, f"messages: {len(data['messages'])} messages; this endpoint takes at most "
                                f"{self.args.max_messages}", param="messages")
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
            top = req.top_logprobs_wanted()
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="top_logprobs") from None
        self.check_model(req.model)
        if (field := req.unsupported()) is not None:
            raise APIError(400, f"{field} is not supported by this server", param=field)
        if len(req.stop) > self.args.max_stop:
            raise APIError(400, f"stop: {len(req.stop)} stop strings; this endpoint takes at most "
                                f"{self.args.max_stop}", param="stop")
        loop = asyncio.get_running_loop()
        try:
            if chat:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                prompt_ids = await loop.run_in_executor(self.tokenizing, self.backend.encode_chat, messages)
            elif isinstance(req.prompt, str):
                prompt_ids = await loop.run_in_executor(self.tokenizing, self.backend.encode_text, req.prompt)
            else:
                prompt_ids = list(req.prompt)
            max_tokens = (req.max_completion_tokens if chat else None) or req.max_tokens
            if max_tokens is None:
                max_tokens = max(1, min(self.args.default_max_tokens, self.args.max_len - len(prompt_ids),
                                        self.backend.context - len(prompt_ids)))
            self.backend.check(prompt_ids, max_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages" if chat else "prompt",
                           code="context_length_exceeded" if "context" in str(exc) or "max_len" in str(exc)
                           else None) from None
        sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p)
        no_eos = (-1,) if req.ignore_eos else ()  # -1 is no token: nothing ends the request early
        return req, prompt_ids, DecodeConfig(max_new_tokens=max_tokens, sampling=sampling, seed=req.seed,
                                             eos_token_ids=no_eos), top
