"""The Ray Serve application: a FastAPI ingress speaking the OpenAI API.

    serve run deploy/serve.yaml        # import_path: cluster.serve.app:build

A request is parsed and checked in full (JSON, fields, model name, prompt length)
before it takes a slot; then it waits its turn (`admission.py`), decodes on the
replica's decode thread, and its tokens come back as they are committed: one JSON body,
or server-sent events with `stream: true`.
"""


import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from cluster.serve.admission import Admission, ClientGone, QueueFull, Ticket
from cluster.serve.backend import Backend
from cluster.serve.config import ServeArgs
from cluster.serve.metrics import Metrics
from cluster.serve.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    completion_body,
    new_id,
    usage,
)
from cluster.serve.text import TextStream
from decoding.request import DecodeConfig, GenerationResult
from decoding.sampling import SamplingParams

log = logging.getLogger("ray.serve")
api = FastAPI(title="specray", description="OpenAI-compatible, lossless speculative decoding")


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _Job:
    """One admitted request: its decode, and the text it releases as tokens land."""

    def __init__(self, ticket: Ticket, text: TextStream, arrived: float):
        self.ticket, self.text, self.arrived = ticket, text, arrived
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def on_tokens(self, ids: list[int]) -> bool:
        """Decode thread: release final text to the event loop; True at a stop string."""
        self.ticket.check()
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.text.stopped:
            return True
        delta = self.text.push(ids)
        self.completion_tokens += len(ids)
        if delta:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        return self.text.stopped


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, args: ServeArgs | dict):
        self.args = args if isinstance(args, ServeArgs) else ServeArgs(**args)
        self.model = self.args.model_name
        self.backend = Backend(self.args)
        self.admission = Admission(self.args.max_pending)
        self.metrics = Metrics()
        self.created = int(time.time())

    # ---- routes ----------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model, **self.admission.state(), "runtime": self.backend.runtime}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "specray"}]}

    @api.get("/v1/models/{name:path}")
    async def model(self, name: str) -> dict:
        self._check_model(name)
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "specray"}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # ---- one request -----------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        route = "chat" if chat else "completions"
        arrived = time.monotonic()
        try:
            req, prompt_ids, cfg = await self._parse(request, chat)
            ticket = self.admission.admit()
        except QueueFull as exc:
            self.metrics.answered(self.model, route, 503)
            raise APIError(503, str(exc), "server_overloaded", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except APIError as exc:
            self.metrics.answered(self.model, route, exc.status)
            raise
        self.metrics.pending.set(self.admission.pending, tags={"model": self.model})
        job = _Job(ticket, TextStream(self.backend.tokenizer, req.stop), arrived)
        rid = new_id("chatcmpl" if chat else "cmpl")
        task = asyncio.create_task(self._decode(job, prompt_ids, cfg, req.specray.speculative, route))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(job, task, rid, chat, len(prompt_ids), include_usage),
                                     media_type="text/event-stream")
        try:
            result, finish = await asyncio.shield(task)
        except asyncio.CancelledError:
            ticket.cancelled = True  # the client went away: stop decoding, free the slot
            raise
        except Exception as exc:
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from None
        body = completion_body(rid, self.model, job.text.released, finish, chat)
        body["usage"] = usage(len(prompt_ids), job.completion_tokens)
        body["specray"] = self._extension(result)
        return body

    async def _parse(self, request: Request, chat: bool):
        try:
            data = json.loads(await request.body())
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
        self._check_model(req.model)
        if (field := req.unsupported()) is not None:
            raise APIError(400, f"{field} is not supported by this server", param=field)
        try:
            if chat:
                prompt_ids = self.backend.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
            elif isinstance(req.prompt, str):
                prompt_ids = self.backend.encode_text(req.prompt)
            else:
                prompt_ids = list(req.prompt)
            max_tokens = (req.max_completion_tokens if chat else None) or req.max_tokens
            if max_tokens is None:
                max_tokens = max(1, min(self.args.default_max_tokens, self.backend.context - len(prompt_ids)))
            self.backend.check(prompt_ids, max_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages" if chat else "prompt",
                           code="context_length_exceeded" if "context" in str(exc) else None) from None
        sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p)
        return req, prompt_ids, DecodeConfig(max_new_tokens=max_tokens, sampling=sampling, seed=req.seed)

    def _check_model(self, name: str) -> None:
        if name != self.model:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model}`",
                           param="model", code="model_not_found")

    async def _decode(self, job: _Job, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool,
                      route: str) -> tuple[GenerationResult | None, str]:
        """Wait for a turn, decode, account. Returns (result, finish_reason); the text goes
        to `job.queue`, closed by None."""
        status = 500
        try:
            result = await self.admission.run(
                job.ticket, lambda: self.backend.generate(prompt_ids, cfg, speculative, job.on_tokens))
            status = 200
        except (ClientGone, asyncio.CancelledError):
            status = 499  # nginx's "client closed request"
            return None, "cancelled"
        except Exception:
            log.exception("decode failed")
            raise
        finally:
            self.metrics.answered(self.model, route, status)
            self.metrics.pending.set(self.admission.pending - 1, tags={"model": self.model})
            if status != 200:
                job.queue.put_nowait(None)
        if tail := job.text.finish():
            job.queue.put_nowait(tail)
        job.queue.put_nowait(None)
        eos = result.token_ids and result.token_ids[-1] in self._eos(cfg)
        finish = "stop" if job.text.stopped or eos else "length"
        if not job.text.stopped:
            job.completion_tokens = len(result.token_ids)
        ttft = job.first_token_at - job.arrived if job.first_token_at else None
        decode_s = time.monotonic() - (job.first_token_at or time.monotonic())
        self.metrics.finished(self.model, route, result.stats, ttft, decode_s)
        return result, finish

    def _eos(self, cfg: DecodeConfig) -> set[int]:
        eos = set(cfg.eos_token_ids)
        eos.update(getattr(self.backend.decoder, "eos_token_ids", ()) or ())
        if self.backend.tokenizer.eos_token_id is not None:
            eos.add(self.backend.tokenizer.eos_token_id)
        return eos

    async def _events(self, job: _Job, task: asyncio.Task, rid: str, chat: bool, prompt_tokens: int,
                      include_usage: bool):
        """Server-sent events: text deltas as they become final, then finish and usage."""
        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        try:
            first = True
            if chat:  # the role comes first, as OpenAI sends it
                yield event(completion_body(rid, self.model, "", None, chat, first=True, stream=True))
                first = False
            while (delta := await job.queue.get()) is not None:
                yield event(completion_body(rid, self.model, delta, None, chat, first=first, stream=True))
                first = False
            result, finish = await task
            last = completion_body(rid, self.model, "", finish, chat, stream=True)
            last["specray"] = self._extension(result)
            yield event(last)
            if include_usage:  # as OpenAI does: one more chunk, no choices, the counts
                counts = completion_body(rid, self.model, None, None, chat, stream=True)
                counts["choices"], counts["usage"] = [], usage(prompt_tokens, job.completion_tokens)
                yield event(counts)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            log.warning("stream failed: %s", exc)
            yield event({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                   "type": "server_error", "param": None, "code": None}})
        finally:
            job.ticket.cancelled = job.ticket.cancelled or not task.done()  # client gone: free the slot

    @staticmethod
    def _extension(result: GenerationResult | None) -> dict:
        if result is None:
            return {}
        s = result.stats
        return {"mean_accepted": round(s.mean_accepted, 4), "tokens_per_s": round(s.tokens_per_s, 4),
                "new_tokens": s.new_tokens, "drafted_tokens": s.drafted_tokens,
                "accepted_tokens": s.accepted_tokens, "target_forwards": s.target_forwards,
                "wall_s": round(s.wall_s, 4), "drafter_lost": s.drafter_lost,
                **s.labels}  # how the models attended: "approximate": true when the target attends sparsely

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def build(args: ServeArgs):
    """Serve's application builder: `import_path: cluster.serve.app:build`. `args` is
    checked against `ServeArgs` by Serve before anything loads (which is why this module
    keeps real annotations: no `from __future__ import annotations`)."""
    return OpenAIServer.options(max_ongoing_requests=args.max_pending + 16).bind(args.model_dump())
