"""The Ray Serve application: a FastAPI ingress speaking the OpenAI API.

    serve run deploy/serve.yaml        # import_path: cluster.serve.app:build

A request is checked in full (API key, body size, JSON, fields, model name, prompt length;
tokenized on a worker thread) before it takes a place; then it goes to the replica's
decoder (`cluster/decoder.py`: batched with every other running request where the way
of decoding allows) and its tokens come back as they are committed: one JSON body, or
server-sent events with `stream: true`.
"""


import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.decoder import Request as DecodeRequest
from cluster.decoder import TokenEvent
from cluster.serve.admission import Admission, QueueFull
from cluster.serve.backend import Backend
from cluster.serve.config import ServeArgs
from cluster.serve.metrics import Metrics
from cluster.serve.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    completion_body,
    logprobs_body,
    new_id,
    openapi_body,
    usage,
)
from cluster.serve.text import TextStream
from decoding.request import DecodeConfig, GenerationResult
from decoding.sampling import SamplingParams

log = logging.getLogger("ray.serve")
# The OpenAPI document and its page are routes of the server below, behind the same key as the API.
api = FastAPI(title="specray", description="OpenAI-compatible, lossless speculative decoding", openapi_url=None,
              docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own answers (no such route: 404, wrong method: 405) in OpenAI's shape too."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    """Anything else is our fault: a 500 in OpenAI's shape, the cause in the replica's log."""
    log.error("unexpected %s answering a request", type(exc).__name__, exc_info=exc)
    return JSONResponse(APIError(500, f"internal error ({type(exc).__name__})", "server_error").body(),
                        status_code=500)


class DeadlineExceeded(Exception):
    """A request ran past its deadline; the decoder has been told to cancel it."""


RECLAIM_GRACE_S = 30.0  # past a request's deadline: time its stream has to close before it is let go


class _Job:
    """One admitted request: its token events, and the text it releases as tokens land."""

    def __init__(self, rid: str, arrived: float, logprobs: int | None, timeout_s: float):
        self.rid, self.arrived, self.logprobs = rid, arrived, logprobs
        self.text: TextStream | None = None
        self.reclaim: asyncio.TimerHandle | None = None  # lets the slot go if nothing else did
        self.timeout_s, self.deadline = timeout_s, arrived + timeout_s
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.final: TokenEvent | None = None
        self.closed = False  # accounted for (admission slot released, status counted)
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def on_event(self, event: TokenEvent) -> None:
        """The decoder's thread: hand the event to the event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, args: ServeArgs | dict):
        self.args = args if isinstance(args, ServeArgs) else ServeArgs(**args)
        self.model = self.args.model_name
        self.api_key = self.args.resolved_api_key()
        self.backend = Backend(self.args)
        self.decoder = self.backend.decoder
        self.admission = Admission(self.args.max_pending, self.decoder.state().get("max_seqs", 1))
        self.metrics = Metrics()
        self.created = int(time.time())
        self.tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.reclaim_grace_s = RECLAIM_GRACE_S
        self.reading = 0  # requests sending their body right now (`max_reading`)

    # ---- routes ----------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's own check (every `health_check_period_s`): a replica whose decoder died or
        is wedged is replaced, instead of answering "ok" while requests hang."""
        if (why := self.decoder.health()) is not None:
            raise RuntimeError(why)

    @api.get("/health")
    async def health(self):
        why = self.decoder.health()
        body = {"status": "ok" if why is None else "unhealthy", "model": self.model, **self.admission.state(),
                "decoder": self.decoder.state(), "runtime": self.backend.runtime}
        if why is not None:
            return JSONResponse({**body, "reason": why}, status_code=503)
        return body

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "specray"}]}

    @api.get("/v1/models/{name:path}")
    async def model(self, name: str, request: Request) -> dict:
        self._authorize(request)
        self._check_model(name)
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "specray"}

    @api.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        from fastapi.openapi.docs import get_swagger_ui_html

        self._authorize(request)
        prefix = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{prefix}/openapi.json", title="specray")

    # ---- one request -----------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        route = "chat" if chat else "completions"
        arrived = time.monotonic()
        try:
            self._authorize(request)
            req, prompt_ids, cfg, top = await self._parse(request, chat)
            self.admission.admit()
        except QueueFull as exc:
            self.metrics.answered(self.model, route, 503)
            raise APIError(503, str(exc), "server_overloaded", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except APIError as exc:
            self.metrics.answered(self.model, route, exc.status)
            raise
        except Exception:  # answered by the catch-all (a 500 in OpenAI's shape), counted here
            self.metrics.answered(self.model, route, 500)
            raise
        # Admitted: from here every way out releases the slot (`_done`), whatever is raised.
        timeout_s = min(self.args.request_timeout_s, req.specray.timeout_s or self.args.request_timeout_s)
        job = _Job(new_id("chatcmpl" if chat else "cmpl"), arrived, top, timeout_s)
        try:
            self.metrics.pending.set(self.admission.pending, tags={"model": self.model})
            job.text = TextStream(self.backend.tokenizer, req.stop)
            # A stream whose client leaves before its first chunk never starts its generator,
            # so its `finally` never runs: past the deadline, whatever is still open is let go.
            job.reclaim = job.loop.call_later(timeout_s + self.reclaim_grace_s, self._reclaim, job, route)
            return await self._answer(job, req, prompt_ids, cfg, chat, route)
        except asyncio.CancelledError:  # the client went away: stop decoding, free the slot
            self._abandon(job, route)
            raise
        except APIError as exc:
            self._done(job, route, exc.status)
            raise
        except BaseException:
            self.decoder.cancel(job.rid)
            self._done(job, route, 500)
            raise

    async def _answer(self, job: _Job, req, prompt_ids: list[int], cfg: DecodeConfig, chat: bool, route: str):
        try:
            self.decoder.submit(DecodeRequest(prompt_ids, cfg, req.specray.speculative, job.logprobs, id=job.rid),
                                job.on_event)
        except ValueError as exc:  # a limit only the decoder knows (its KV budget)
            raise APIError(400, str(exc)) from None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(job, chat, len(prompt_ids), include_usage, route),
                                     media_type="text/event-stream")
        text, entries = [], [] if job.logprobs is not None else None
        try:
            async for delta, lps in self._deltas(job):
                text.append(delta)
                if entries is not None:
                    entries += lps
        except DeadlineExceeded:
            raise APIError(504, self._deadline_message(job), "timeout_error", code="request_timeout") from None
        if job.final.error is not None:
            raise APIError(500, f"generation failed: {job.final.error}", "server_error")
        self._done(job, route, 200)
        body = completion_body(job.rid, self.model, "".join(text), self._finish_reason(job), chat,
                               logprobs=logprobs_body(entries, chat))
        body["usage"] = usage(len(prompt_ids), job.completion_tokens)
        body["specray"] = self._extension(job.final.result)
        return body

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: send Authorization: Bearer <key>",
                           "invalid_request_error", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
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

    async def _parse(self, request: Request, chat: bool):
        raw = await self._read_body(request)
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
        self._check_model(req.model)
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

    def _check_model(self, name: str) -> None:
        if name != self.model:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model}`",
                           param="model", code="model_not_found")

    async def _deltas(self, job: _Job):
        """Text that became final, with its tokens' logprobs, until the decoder's last event.
        A stop string ends the request in the decoder (cancel) and the text before it."""
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), max(0.0, job.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.decoder.cancel(job.rid)  # its KV is freed at the decoder's next step
                raise DeadlineExceeded from None
            if event.token_ids and not job.text.stopped:
                if job.first_token_at is None:
                    job.first_token_at = time.monotonic()
                job.completion_tokens += len(event.token_ids)
                delta = job.text.push(event.token_ids)
                if job.text.stopped:
                    self.decoder.cancel(job.rid)
                lps = [(self.backend.token_text(x.token), x.logprob,
                        [(self.backend.token_text(t), lp) for t, lp in x.top]) for x in event.logprobs or []]
                if delta or lps:
                    yield delta, lps
            if event.done:
                job.final = event
                if event.error is None and (tail := job.text.finish()):
                    yield tail, []
                return

    @staticmethod
    def _deadline_message(job: _Job) -> str:
        return (f"the request ran past its deadline of {job.timeout_s:g} s and was cancelled "
                "(a request's specray.timeout_s, capped by the server's request_timeout_s)")

    def _finish_reason(self, job: _Job) -> str:
        if job.text.stopped:
            return "stop"
        return "stop" if job.final.finish_reason == "stop" else "length"

    def _done(self, job: _Job, route: str, status: int) -> None:
        if job.closed:
            return
        job.closed = True
        if job.reclaim is not None:
            job.reclaim.cancel()
        self.admission.release(time.monotonic() - job.arrived)
        self.metrics.answered(self.model, route, status)
        self.metrics.pending.set(self.admission.pending, tags={"model": self.model})
        if status == 200 and job.final is not None and job.final.result is not None:
            ttft = job.first_token_at - job.arrived if job.first_token_at else None
            decode_s = time.monotonic() - (job.first_token_at or time.monotonic())
            self.metrics.finished(self.model, route, job.final.result.stats, ttft, decode_s)
            self.metrics.load(self.model, self.decoder.state())

    def _reclaim(self, job: _Job, route: str) -> None:
        if not job.closed:
            log.warning("request %s still open %g s past its deadline: cancelled, its slot released", job.rid,
                        self.reclaim_grace_s)
            self._abandon(job, route)

    def _abandon(self, job: _Job, route: str) -> None:
        self.decoder.cancel(job.rid)
        self.admission.abandoned += 1
        self._done(job, route, 499)  # nginx's "client closed request"

    async def _stream(self, job: _Job, chat: bool, prompt_tokens: int, include_usage: bool, route: str):
        """Server-sent events: text deltas as they become final, then finish and usage."""
        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            first = True
            if chat:  # the role comes first, as OpenAI sends it
                yield event(completion_body(job.rid, self.model, "", None, chat, first=True, stream=True))
                first = False
            offset = 0
            async for delta, lps in self._deltas(job):
                yield event(completion_body(job.rid, self.model, delta, None, chat, first=first, stream=True,
                                            logprobs=logprobs_body(lps, chat, offset) if job.logprobs is not None
                                            else None))
                offset += len(delta)
                first = False
            finished = True
            if job.final.error is not None:
                raise RuntimeError(job.final.error)
            self._done(job, route, 200)
            last = completion_body(job.rid, self.model, "", self._finish_reason(job), chat, stream=True)
            last["specray"] = self._extension(job.final.result)
            yield event(last)
            if include_usage:  # as OpenAI does: one more chunk, no choices, the counts
                counts = completion_body(job.rid, self.model, None, None, chat, stream=True)
                counts["choices"], counts["usage"] = [], usage(prompt_tokens, job.completion_tokens)
                yield event(counts)
            yield "data: [DONE]\n\n"
        except DeadlineExceeded:
            finished = True
            self._done(job, route, 504)
            yield event({"error": {"message": self._deadline_message(job), "type": "timeout_error", "param": None,
                                   "code": "request_timeout"}})
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            log.warning("stream failed: %s", exc)
            self._done(job, route, 500)
            yield event({"error": {"message": f"generation failed: {exc}",
                                   "type": "server_error", "param": None, "code": None}})
        finally:
            if not finished:  # the client went away mid-stream: stop decoding, free the slot
                self._abandon(job, route)

    @staticmethod
    def _extension(result: GenerationResult | None) -> dict:
        if result is None:
            return {}
        s = result.stats
        return {"mean_accepted": round(s.mean_accepted, 4), "tokens_per_s": round(s.tokens_per_s, 4),
                "new_tokens": s.new_tokens, "drafted_tokens": s.drafted_tokens,
                "accepted_tokens": s.accepted_tokens, "target_forwards": s.target_forwards,
                "wall_s": round(s.wall_s, 4), "drafter_lost": s.drafter_lost,
                "mean_drafted": round(s.drafted_tokens / s.verify_rounds, 4) if s.verify_rounds else 0.0,
                **s.labels}  # how the models attended: "approximate": true when the target attends sparsely

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def build(args: ServeArgs):
    """Serve's application builder: `import_path: cluster.serve.app:build`. `args` is
    checked against `ServeArgs` by Serve before anything loads (which is why this module
    keeps real annotations: no `from __future__ import annotations`)."""
    # room for every admitted request, every body being read, and /health and /v1/models
    return OpenAIServer.options(max_ongoing_requests=ongoing_requests(args)).bind(args.model_dump())


def ongoing_requests(args: ServeArgs) -> int:
    """Serve's `max_ongoing_requests` for a replica with these args (deploy/serve.yaml's must be
    at least this): admitted requests, bodies being read, and 16 more for the cheap routes."""
    return args.max_pending + args.max_reading + 16
