"""The Ray Serve application: a FastAPI ingress speaking the OpenAI API.

    serve run deploy/serve.yaml        # import_path: cluster.serve.app:build

A request is checked in full (`cluster/serve/intake.py`) before it takes a place; then it
goes to the replica's decoder (`cluster/decoder.py`: batched with every other running
request where the way of decoding allows) and its tokens come back as they are committed
(`cluster/serve/responses.py`: one JSON body, or server-sent events with `stream: true`).
Here: the routes, errors in OpenAI's shape, and the admission slot a request holds from
admission to its last byte, kept in one place so that every way out gives the slot back.
"""


import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve.admission import Admission, QueueFull
from cluster.serve.backend import Backend
from cluster.serve.config import ServeArgs
from cluster.serve.intake import Intake
from cluster.serve.metrics import Metrics
from cluster.serve.openai_api import APIError, ChatCompletionRequest, CompletionRequest, new_id, openapi_body
from cluster.serve.responses import Job, Responder
from cluster.serve.text import TextStream

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


RECLAIM_GRACE_S = 30.0  # past a request's deadline: time its stream has to close before it is let go


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class OpenAIServer(Responder):
    def __init__(self, args: ServeArgs | dict):
        self.args = args if isinstance(args, ServeArgs) else ServeArgs(**args)
        self.model = self.args.model_name
        api_key = self.args.resolved_api_key()  # a key named but not set fails before anything loads
        self.backend = Backend(self.args)
        self.decoder = self.backend.decoder
        self.admission = Admission(self.args.max_pending, self.decoder.state().get("max_seqs", 1))
        self.metrics = Metrics()
        self.created = int(time.time())
        self.intake = Intake(self.args, self.backend, self.model, api_key)
        self.reclaim_grace_s = RECLAIM_GRACE_S

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
        self.intake.authorize(request)
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "specray"}]}

    @api.get("/v1/models/{name:path}")
    async def model(self, name: str, request: Request) -> dict:
        self.intake.authorize(request)
        self.intake.check_model(name)
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "specray"}

    @api.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self.intake.authorize(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        from fastapi.openapi.docs import get_swagger_ui_html

        self.intake.authorize(request)
        prefix = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{prefix}/openapi.json", title="specray")

    # ---- one request -----------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        route = "chat" if chat else "completions"
        arrived = time.monotonic()
        try:
            self.intake.authorize(request)
            req, prompt_ids, cfg, top = await self.intake.parse(request, chat)
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
        job = Job(new_id("chatcmpl" if chat else "cmpl"), arrived, top, timeout_s)
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

    def _done(self, job: Job, route: str, status: int) -> None:
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

    def _reclaim(self, job: Job, route: str) -> None:
        if not job.closed:
            log.warning("request %s still open %g s past its deadline: cancelled, its slot released", job.rid,
                        self.reclaim_grace_s)
            self._abandon(job, route)

    def _abandon(self, job: Job, route: str) -> None:
        self.decoder.cancel(job.rid)
        self.admission.abandoned += 1
        self._done(job, route, 499)  # nginx's "client closed request"

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
