"""The batched decoder: one thread loops admit -> prefill a chunk -> one round for all.

Requests arrive from any thread (`submit`, `cancel`); everything else happens on the
loop thread, so the scheduler, the slot pool and the sequences need no locks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from actors.drafters.none import NoDrafter
from actors.verifier import SlotPool, TargetVerifier
from cluster.batching.drafters import make_drafter
from cluster.batching.scheduler import BatchConfig, Scheduler
from cluster.decoder import STALL_S, Decoder, EventSink, Request, TokenEvent
from cluster.engine import attention_label
from decoding.request import GenerationResult
from decoding.round import Committed, Drafter, Verifier, first_tokens, speculative_round
from decoding.sequence import Sequence, Status

log = logging.getLogger(__name__)


class BatchEngine(Decoder):
    """Continuous batching over a `LocalEngine`'s loaded target, with its draft model or
    heads: each round is `decoding.round.speculative_round` over every running sequence."""

    def __init__(self, engine, cfg: BatchConfig | None = None, drafter: Drafter | None = None,
                 verifier: Callable[[int], Verifier] | None = None):
        """`drafter`: how to draft (default: what the engine loaded: its draft model, else
        its heads, else none). `verifier`: given the KV room a sequence needs, what scores
        the trees (default: the engine's target; an ensemble: `EnsembleVerifier`)."""
        target = engine.target_runner
        self.engine, self.cfg = engine, cfg or BatchConfig()
        self.tokenizer, self.context_length = engine.tokenizer, engine.context_length
        self.eos_token_ids = tuple(engine.eos_token_ids)
        self.max_len = min(engine.cfg.max_len or self.context_length, self.context_length)
        room = self.max_len + self.cfg.max_draft + 2
        self.drafter = drafter or make_drafter(engine, self.cfg.max_seqs, room, self.cfg.max_draft)
        room += self.drafter.tree_room
        self.verifier = verifier(room) if verifier is not None else \
            TargetVerifier(target.model, SlotPool(target.model, self.cfg.max_seqs, room), target.attention)
        self.pool = self.verifier.pool
        if not isinstance(self.drafter, NoDrafter):  # seed the choice of k with this machine's costs
            sizes = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k not in engine.verify_costs)
            self.verifier.costs.seed({**engine.verify_costs, **(target.measure_verify_costs(sizes) if sizes else {})})
        self.scheduler = Scheduler(self.cfg, self.drafter, self.verifier.costs)
        self.rounds = 0
        # (target's attention, draft, draft's attention) for the output's labels; a drafter
        # elsewhere sets its own
        self.attends = (engine.cfg.attention, engine.cfg.draft, engine.cfg.draft_attention)
        self.draft_lengths: dict[str, int] = {}  # chosen k ("auto": the drafter's policy) -> rounds, since start
        self._sinks: dict[str, EventSink] = {}
        self._seqs: dict[str, Sequence] = {}
        self._inbox: deque[Sequence] = deque()
        self._cancels: deque[str] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._step_began: float | None = None  # while a step runs: when it began
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------
    def submit(self, request: Request, on_event: EventSink) -> None:
        cfg, n = request.cfg, len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + cfg.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds this engine's "
                             f"max_len of {self.max_len} tokens")
        if cfg.cache_room(n) > self.cfg.kv_tokens:
            raise ValueError(f"this request needs {cfg.cache_room(n)} KV entries; the engine's budget is "
                             f"{self.cfg.kv_tokens}")
        if cfg.tree_width != 1:
            raise ValueError("the batched engine drafts chains or heads' trees (tree_width 1)")
        if request.logprobs is not None and request.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {request.logprobs}")
        if not cfg.eos_token_ids:
            cfg = dataclasses.replace(cfg, eos_token_ids=self.eos_token_ids)
        seq = Sequence(request.id, list(request.prompt_ids), cfg, request.speculative, request.logprobs)
        with self._wake:
            if self._closed:
                raise RuntimeError("this decoder is closed")
            self._sinks[seq.id] = on_event
            self._inbox.append(seq)
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        with self._wake:
            self._cancels.append(request_id)
            self._wake.notify()

    def runtime_info(self) -> dict:
        drafter = getattr(self.drafter, "runtime_info", dict)()  # a draft in its own actor says where
        return {**self.engine.runtime_info(), **drafter, "batching": {"max_seqs": self.cfg.max_seqs,
                                                           "kv_tokens": self.cfg.kv_tokens,
                                                           "max_draft": self.cfg.max_draft}}

    def state(self) -> dict:
        with self._wake:
            inbox = len(self._inbox)
        s = self.scheduler.state()
        s["waiting"] += inbox
        return {**s, "batching": True, "rounds": self.rounds,
                "draft_lengths": dict(sorted(self.draft_lengths.items()))}

    def health(self) -> str | None:
        if not self._thread.is_alive() and not self._closed:
            return "the batch engine's thread is not running"
        if (lost := getattr(self.verifier, "lost", None)) is not None:  # an ensemble member in another process
            return f"lost {lost}"
        began = self._step_began
        if began is not None and time.monotonic() - began > STALL_S:
            return f"a batch step has run for {time.monotonic() - began:.0f} s"
        return None

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        for part in (self.drafter, self.verifier):  # a drafter or members in other processes: stop them too
            close = getattr(part, "close", None)
            if close is not None:
                close()

    # ---- the loop thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._cancels or self._busy()) and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                arrived, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = list(self._cancels), deque()
            for seq in arrived:
                self._seqs[seq.id] = seq
                self.scheduler.add(seq)
            for rid in cancels:
                if (seq := self._seqs.get(rid)) is not None:
                    seq.finish_reason = "cancelled"
                    self._finish(seq)
            self._step_began = time.monotonic()
            try:
                self._step()
            except Exception as exc:  # fail what was in the step; the engine carries on
                log.exception("batch step failed")
                for seq in [*self.scheduler.prefilling, *self.scheduler.running]:
                    self._finish(seq, error=f"{type(exc).__name__}: {exc}")
            finally:
                self._step_began = None

    def _busy(self) -> bool:
        s = self.scheduler
        return bool(s.running or s.prefilling or (s.waiting and self.pool.available))

    def _step(self) -> None:
        for seq in self.scheduler.admit(self.pool.available):
            self.verifier.attach(seq)
            seq.started_at = time.perf_counter()
        if chunks := self.scheduler.prefill_chunks():
            for done in first_tokens(self.verifier.prefill(chunks), self.drafter):
                self.scheduler.started(done.seq)
                self._emit(done)
        running = [s for s in self.scheduler.running if s.finish_reason is None]
        if running:
            k = self.scheduler.draft_length()
            self.rounds += 1
            key = "auto" if k is None else str(k)
            self.draft_lengths[key] = self.draft_lengths.get(key, 0) + 1
            for done in speculative_round(running, self.drafter, self.verifier, k):
                self._emit(done)

    def _emit(self, done: Committed) -> None:
        seq = done.seq
        if done.error is not None:  # its own part of the step failed: the others carry on
            log.error("request %s failed in its part of a step: %s", seq.id, done.error)
            self._finish(seq, error=done.error)
            return
        if done.tokens:
            self._send(seq.id, TokenEvent(seq.id, done.tokens, done.logprobs))
        if seq.finish_reason is not None:
            self._finish(seq)

    def _finish(self, seq: Sequence, error: str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        self.scheduler.remove(seq)
        self.verifier.free(seq)  # at once: the next admission can take the slot
        self.drafter.release(seq)
        seq.status = Status.FINISHED
        self._seqs.pop(seq.id, None)
        st = seq.stats
        st.new_tokens = len(seq.output)
        st.wall_s = time.perf_counter() - seq.started_at if seq.started_at else 0.0
        attention, draft, draft_attention = self.attends  # say how the models attended, as the serial loops do
        st.labels.update(attention_label(attention, draft, draft_attention if seq.speculative else None))
        result = None if error else GenerationResult(list(seq.output), st)
        self._send(seq.id, TokenEvent(seq.id, [], finish_reason="error" if error else seq.finish_reason,
                                      result=result, error=error), last=True)

    def _send(self, rid: str, event: TokenEvent, last: bool = False) -> None:
        sink = self._sinks.pop(rid, None) if last else self._sinks.get(rid)
        if sink is None:
            return
        try:
            sink(event)
        except Exception:  # a consumer's failure must not stop the batch
            log.exception("token event consumer failed for request %s", rid)
