"""The one interface every front end speaks: submit a request, receive its token events,
cancel it. The Serve endpoint, the CLI and the job entry get their decoder from
`cluster.factory.make_decoder` and never ask which kind it is.

How a request flows: the endpoint parses and tokenizes it (`cluster/serve/app.py`) and
calls `Decoder.submit`. With `batch` set (Serve always sets it) and any way of
drafting, the decoder is a `BatchEngine` (`cluster/batching/engine.py`): its
scheduler admits the request when a cache slot and KV budget are free, prefills its
prompt in chunks, and from then on every round (`decoding/round.py`) drafts a tree for
each running sequence (`actors/drafters/`), verifies all of them in one target forward
(`actors/verifier.py`), accepts per sequence and sends each request its committed tokens
as a `TokenEvent`. Without `batch` (the CLI's `generate` and `bench`) the same engines
and the single-request Ray pipelines run behind a `SerialDecoder`: the same interface,
one request at a time.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from decoding.logprobs import TokenLogprob
from decoding.request import DecodeConfig, GenerationResult, GenerationStats, TokenSink


@dataclass
class Request:
    prompt_ids: list[int]
    cfg: DecodeConfig
    speculative: bool = True  # False: the target alone (same output)
    logprobs: int | None = None  # None: none; k >= 0: each token's and the target's top k
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    request_id: str
    token_ids: list[int]  # newly committed
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set on the last event: stop | length | cancelled | error
    result: GenerationResult | None = None  # on the last event (None after an error)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


EventSink = Callable[[TokenEvent], None]


class Decoder(ABC):
    tokenizer: object
    context_length: int
    eos_token_ids: tuple[int, ...]

    @abstractmethod
    def submit(self, request: Request, on_event: EventSink) -> None:
        """Queue a request; raise ValueError (naming what is wrong) before queuing if it
        cannot run here. `on_event` is called from the decoder's thread: keep it short."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """End a request at its next tokens; its cache is freed; a last event follows."""

    @abstractmethod
    def runtime_info(self) -> dict: ...

    @abstractmethod
    def state(self) -> dict:
        """Load right now: running, waiting, capacity, the speculation chosen."""

    def health(self) -> str | None:
        """None while the decoder can serve; else why not (its thread died, or it has work and
        has made no progress for `STALL_S`). Serve's health check replaces a replica on it."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool = True,
                 on_tokens: TokenSink | None = None) -> GenerationResult:
        """Submit and wait: the blocking call the CLI and the job use. `on_tokens` may
        return True to end the request there (a stop string)."""
        events: queue.Queue[TokenEvent] = queue.Queue()
        request = Request(list(prompt_ids), cfg, speculative)
        self.submit(request, events.put)
        tokens, stopped = [], False
        while True:
            ev = events.get()
            tokens += ev.token_ids
            if ev.token_ids and on_tokens is not None and not stopped and on_tokens(ev.token_ids) is True:
                stopped = True
                self.cancel(request.id)
            if ev.done:
                if ev.error is not None:
                    raise RuntimeError(ev.error)
                return ev.result or GenerationResult(tokens, GenerationStats(new_tokens=len(tokens)))


STALL_S = 300.0  # no step (batched) or no token (serial) for this long, with work in hand: wedged


class SerialDecoder(Decoder):
    """Any `generate(prompt_ids, cfg, speculative, on_tokens)` engine, one request at a
    time on its own thread, behind the `Decoder` interface."""

    def __init__(self, engine, generate: Callable[..., GenerationResult], tokenizer, context_length: int,
                 eos_token_ids: tuple[int, ...] = ()):
        self.engine, self._generate = engine, generate
        self.tokenizer, self.context_length = tokenizer, context_length
        eos = set(eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self._queue: deque[tuple[Request, EventSink]] = deque()
        self._cancelled: set[str] = set()
        self._running: str | None = None
        self._progress_at = time.monotonic()  # the running request's latest tokens (or its start)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="serial-decoder", daemon=True)
        self._thread.start()

    def submit(self, request: Request, on_event: EventSink) -> None:
        if request.logprobs is not None:
            raise ValueError("logprobs are returned by the batched engine (any server with batching); this "
                             "decoder runs one request at a time")
        with self._wake:
            self._queue.append((request, on_event))
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        with self._wake:
            self._cancelled.add(request_id)

    def runtime_info(self) -> dict:
        return self.engine.runtime_info()

    def state(self) -> dict:
        return {"running": int(self._running is not None), "waiting": len(self._queue), "max_seqs": 1,
                "batching": False}

    def health(self) -> str | None:
        if not self._thread.is_alive() and not self._closed:
            return "the decoder's thread is not running"
        idle_s = time.monotonic() - self._progress_at
        if self._running is not None and idle_s > STALL_S:
            return f"the running request has made no progress for {idle_s:.0f} s"
        return None

    def close(self) -> None:
        with self._wake:
            self._closed = True
            if self._running is not None:
                self._cancelled.add(self._running)  # the running request stops at its next tokens
            waiting = list(self._queue)
            self._queue.clear()
            self._wake.notify()
        for request, on_event in waiting:  # their callers would otherwise wait forever
            on_event(TokenEvent(request.id, [], finish_reason="error", error="the decoder was closed"))
        # Joined, not left to exit with the interpreter: a daemon thread that drops the last
        # reference to the engine during finalization frees numpy-backed weights there, and
        # torch's deleter, taking the GIL, aborts the process ("terminate called without an
        # active exception"; seen when `specray generate` exits).
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def _loop(self) -> None:
        while not self._closed:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                request, on_event = self._queue.popleft()
                self._running, self._progress_at = request.id, time.monotonic()
            self._run(request, on_event)
            self._running = None
            self._cancelled.discard(request.id)

    def _run(self, request: Request, on_event: EventSink) -> None:
        rid = request.id
        sent = 0

        def on_tokens(ids: list[int]) -> bool:
            nonlocal sent
            sent += len(ids)
            self._progress_at = time.monotonic()
            on_event(TokenEvent(rid, list(ids)))
            return rid in self._cancelled

        if rid in self._cancelled:
            on_event(TokenEvent(rid, [], finish_reason="cancelled"))
            return
        try:
            result = self._generate(request.prompt_ids, request.cfg, request.speculative, on_tokens)
        except Exception as exc:  # this request fails; the decoder goes on with the next
            on_event(TokenEvent(rid, [], finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
            return
        if rid not in self._cancelled and len(result.token_ids) > sent:  # tokens no callback carried
            on_event(TokenEvent(rid, result.token_ids[sent:]))
        eos = set(request.cfg.eos_token_ids) | set(self.eos_token_ids)
        reason = "cancelled" if rid in self._cancelled else (
            "stop" if result.token_ids and result.token_ids[-1] in eos else "length")
        on_event(TokenEvent(rid, [], finish_reason=reason, result=result))


def wait_idle(decoder: Decoder, timeout_s: float = 30.0) -> None:
    """Until nothing runs or waits (tests, benchmarks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = decoder.state()
        if not s.get("running") and not s.get("waiting") and not s.get("prefilling"):
            return
        time.sleep(0.01)
    raise TimeoutError(f"decoder still busy after {timeout_s} s: {decoder.state()}")
