"""An admitted request answered from the decoder's token events: one JSON body, or
server-sent events with `stream: true`.

Apart from the routes because this is where OpenAI's response shapes meet the decoder's
events: text is released only once final (`TextStream`: stop strings, split characters),
the deadline is enforced between events, and a failure after the headers went out can
only be reported in-band. The slot the request holds is the server's (`_done`,
`_abandon`): every way out of here goes through one of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi.responses import StreamingResponse

from cluster.decoder import Request as DecodeRequest
from cluster.decoder import TokenEvent
from cluster.serve.openai_api import APIError, completion_body, logprobs_body, usage
from cluster.serve.text import TextStream
from decoding.request import DecodeConfig, GenerationResult

log = logging.getLogger("ray.serve")


class DeadlineExceeded(Exception):
    """A request ran past its deadline; the decoder has been told to cancel it."""


class Job:
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


class Responder:
    """The answering half of `OpenAIServer` (cluster/serve/app.py), as a base class: it uses
    the server's `model`, `decoder` and `backend`, and closes a request through the
    server's `_done(job, route, status)` and `_abandon(job, route)`."""

    async def _answer(self, job: Job, req, prompt_ids: list[int], cfg: DecodeConfig, chat: bool, route: str):
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

    async def _deltas(self, job: Job):
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
    def _deadline_message(job: Job) -> str:
        return (f"the request ran past its deadline of {job.timeout_s:g} s and was cancelled "
                "(a request's specray.timeout_s, capped by the server's request_timeout_s)")

    def _finish_reason(self, job: Job) -> str:
        if job.text.stopped:
            return "stop"
        return "stop" if job.final.finish_reason == "stop" else "length"

    async def _stream(self, job: Job, chat: bool, prompt_tokens: int, include_usage: bool, route: str):
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
