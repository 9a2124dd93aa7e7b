"""A draft model in another process (a Ray actor, `actors/draft_server.py`), over the protocol.

Each round sends one `DraftCall` per drafting sequence (only the committed tokens the
server has not seen, so the link carries a few ints per sequence) and reads one
`CandidateTree` back for each: chains drafted in one batched forward on the server's device.
Sampling drafts come with the rows they were drawn from (zero-copy tensor frames), so the
verifier's rejection sampling stays exact. The server's cost is measured here, round trip
included, and weighed by the scheduler like an in-process draft's.

When the server dies (its actor crashed, its node went), the target decodes on alone, which
is exact, and `reconnect` (Ray restarts the actor; this asks it for a new server) runs on a
thread of its own; once it answers, every running sequence is handed to the new server
(all its committed tokens, on its next round) and drafting resumes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.drafters.chains import expected_tokens
from decoding.acceptance import Verdict
from decoding.draft_length import CostModel
from decoding.round import Draft
from decoding.sequence import Sequence
from decoding.tree import TokenTree, draft_fault
from protocol import (
    CandidateTree,
    DealerChannel,
    DraftCall,
    Handshake,
    ModelFingerprint,
    ProtocolError,
    Role,
    Shutdown,
)

log = logging.getLogger(__name__)

# A server that has not answered a round after STUCK_FACTOR times the round's expected time
# (and at least STUCK_FLOOR_S) is taken as stuck (stopped, wedged), not slow: the target
# goes on alone and the server is replaced, instead of every request waiting `timeout_s`.
STUCK_FLOOR_S = 10.0
STUCK_FACTOR = 20.0


@dataclass
class RemoteState:
    synced: int = 0  # committed tokens the server holds for this sequence
    link: int = -1  # the connection the server knows this sequence on (-1: not introduced yet)


class RemoteDrafter:
    def __init__(self, channel: DealerChannel, fingerprint: ModelFingerprint, max_draft: int,
                 step_s: dict[int, float] | None = None, timeout_s: float = 60.0,
                 on_close: Callable[[], None] | None = None, info: dict | None = None,
                 reconnect: Callable[[], DealerChannel] | None = None, alive: Callable[[], bool] | None = None):
        """`channel`: connected to a draft server; `step_s`: its draft step seconds by
        sequences, as measured there (then learned from each round here); `on_close`: what
        stops the server's side (its actor) when the engine closes; `reconnect`: blocks until
        a new server answers and returns a channel to it (None: a lost server stays lost);
        `alive`: False once the server's process is known dead (checked while waiting for an
        answer, so a crash costs a moment, not `timeout_s`)."""
        self.channel, self.fingerprint, self.timeout_s = channel, fingerprint, timeout_s
        self.on_close, self.reconnect, self.alive = on_close, reconnect, alive
        self.info = info or {}  # the server's runtime (model, dtype, device, node), for /health
        self.max_draft = max_draft
        self.tree_room = max_draft + 1
        self.stuck_floor_s = STUCK_FLOOR_S
        self.step = CostModel()  # one draft step for B sequences, round trip included
        self.step.verify_s.update(step_s or {1: 0.01})
        self.rounds = 0
        self.pre_drafts = False  # the server pre-drafts (ssd): a tree that was not is a miss
        self.lost: str | None = None  # why the server stopped answering; then the target decodes alone
        self.link = 0  # bumped at each new server: sequences are introduced to it again
        self.restarts = 0  # servers reconnected to after a loss
        self._fresh: DealerChannel | None = None  # a new server's channel, from the reconnect thread
        self._reconnecting: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        seq.draft = self._state(hidden)  # introduced to the server on its first round

    def _state(self, hidden: torch.Tensor) -> RemoteState:
        return RemoteState()

    def release(self, seq: Sequence) -> None:
        if seq.draft is not None and seq.draft.link == self.link and not self.lost:
            try:
                self.channel.send(Shutdown(session_id=seq.id, step=self.rounds + 1, reason="finished"))
            except ProtocolError as exc:
                self._lose(exc)
        seq.draft = None

    def _lose(self, exc: BaseException) -> None:
        """The server is gone or wrong: stop drafting (every sequence goes on with the target
        alone, which is exact) rather than fail the requests, and look for a new server."""
        self.lost = f"{type(exc).__name__}: {exc}"
        log.warning("the draft server stopped answering (%s); decoding without drafts", self.lost)
        if self.reconnect is not None and self._reconnecting is None and not self._closed.is_set():
            self._reconnecting = threading.Thread(target=self._reconnect, name="draft-reconnect", daemon=True)
            self._reconnecting.start()

    def _reconnect(self) -> None:
        delay = 1.0
        while not self._closed.is_set():
            try:
                self._fresh = self.reconnect()
                return
            except Exception as exc:  # noqa: BLE001 - not back yet (restarting, or gone for good): retry
                log.warning("no draft server yet (%s: %s); trying again in %.0f s", type(exc).__name__, exc, delay)
                if self._closed.wait(delay):
                    return
                delay = min(2 * delay, 60.0)

    def _resume(self) -> None:
        """Take the new server's channel, if the reconnect thread has found one."""
        fresh, self._fresh = self._fresh, None
        if fresh is None:
            return
        self._reconnecting.join()
        old, self.channel = self.channel, fresh
        old.close()
        self.link, self.restarts, self.lost, self._reconnecting = self.link + 1, self.restarts + 1, None, None
        log.warning("a draft server answers again (reconnect %d); drafting resumes", self.restarts)

    def _introduce(self, calls: list[Sequence]) -> None:
        """Sequences the current server has not seen: a handshake each; their next call
        carries all their committed tokens."""
        for s in calls:
            if s.draft.link != self.link:
                self.channel.handshake(Handshake(session_id=s.id, step=0, role=Role.VERIFIER,
                                                 fingerprint=self.fingerprint),
                                       min(self.timeout_s, self.stuck_floor_s), self.alive)
                s.draft.synced, s.draft.link = 0, self.link

    def propose(self, seqs: list[Sequence], k: int | None) -> dict[str, Draft]:
        self._resume()
        calls = [s for s in seqs if s.remaining > 1 and s.draft is not None]
        if self.lost:  # not back yet: these rounds go target-only, and their stats say why
            for s in calls:
                s.stats.drafter_lost = True
            return {}
        if not calls:
            return {}
        try:
            self._introduce(calls)
            return self._propose(calls, k)
        except (ProtocolError, RuntimeError) as exc:
            self._lose(exc)
            for s in seqs:
                s.stats.drafter_lost = True
            return {}

    def _propose(self, calls: list[Sequence], k: int | None) -> dict[str, Draft]:
        alone = k is None
        self.rounds += 1
        began = time.perf_counter()
        for s in calls:
            p = s.cfg.sampling
            self.channel.send(DraftCall(
                session_id=s.id, step=self.rounds, token_ids=s.tokens[s.draft.synced:], position=s.draft.synced,
                depth=self.max_draft if alone else k, remaining=s.remaining, batch=len(calls), alone=alone,
                temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=s.cfg.seed, hidden=self._hidden(s)))
            s.draft.synced = len(s.tokens)
        by_id = {s.id: s for s in calls}
        out: dict[str, Draft] = {}
        expected = self.step.verify(len(calls)) * (self.max_draft if alone else max(k, 1))
        deadline = time.monotonic() + min(self.timeout_s, max(self.stuck_floor_s, STUCK_FACTOR * expected))
        while len(out) < len(calls):
            tree = self.channel.recv(max(0.0, deadline - time.monotonic()), self.alive)
            if not isinstance(tree, CandidateTree) or tree.session_id not in by_id or tree.step != self.rounds:
                raise RuntimeError(f"the draft server answered {type(tree).__name__} "
                                   f"({tree.session_id}, step {tree.step}) to round {self.rounds}")
            s = by_id[tree.session_id]
            self._check(tree, s)
            out[s.id] = self._draft(tree)
            self._count_pre_draft(tree, s)
        elapsed = time.perf_counter() - began
        self._observe_cost(elapsed, out, len(calls), alone)
        for s in calls:
            s.stats.draft_s += elapsed
        return out

    def _count_pre_draft(self, tree: CandidateTree, seq: Sequence) -> None:
        if tree.pre_drafted is not None:
            seq.stats.predraft_hits += 1
            ranks = seq.stats.predraft_hit_ranks
            ranks.extend([0] * (tree.pre_drafted + 1 - len(ranks)))
            ranks[tree.pre_drafted] += 1
        elif self.pre_drafts and seq.stats.verify_rounds > 0:  # the first round has nothing to pre-draft from
            seq.stats.predraft_misses += 1

    def _check(self, tree: CandidateTree, seq: Sequence) -> None:
        """Nothing from the server reaches the target unchecked (`draft_fault`; a tree past
        the room would overrun the cache). A bad tree loses the drafter, not the request
        (`propose` catches RuntimeError)."""
        if tree.token_ids[0] != seq.tokens[-1] or not 1 <= len(tree.token_ids) <= self.tree_room:
            raise RuntimeError(f"the draft server's tree for {seq.id} does not grow from the newest token "
                               f"within {self.tree_room} nodes")
        shape = None if tree.draft_probs is None else tuple(tree.draft_probs.shape)
        if (fault := draft_fault(tree.token_ids, shape, self.fingerprint.vocab_size)) is not None:
            raise RuntimeError(f"the draft server's tree for {seq.id}: {fault}")

    def _hidden(self, seq: Sequence) -> torch.Tensor | None:
        """What the server drafts from besides the tokens (heads: the target's state)."""
        return None

    def _draft(self, tree: CandidateTree) -> Draft:
        if list(tree.parents) != [-1, *range(len(tree.token_ids) - 1)]:
            raise RuntimeError(f"the draft server's tree for {tree.session_id} is not a chain")
        q = None
        if tree.draft_probs is not None:
            q = torch.as_tensor(tree.draft_probs, dtype=torch.float32)
        return Draft(TokenTree.chain(tree.token_ids[0], list(tree.token_ids[1:])), q)

    def _observe_cost(self, elapsed: float, drafts: dict[str, Draft], n: int, alone: bool) -> None:
        depth = max(d.drafted for d in drafts.values())
        if depth and not alone:
            self.step.observe_verify(elapsed / depth, n)

    def runtime_info(self) -> dict:
        return {"draft": {**self.info, "where": "own actor, over the protocol"}}

    def close(self) -> None:
        self._closed.set()
        self.channel.close()
        if self.on_close is not None:
            self.on_close()

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        """Nothing to do here: the next call tells the server what was committed."""

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        ks = [min(k, s.remaining - 1) for s in seqs]
        gains = [expected_tokens(s.acceptance, kk) for s, kk in zip(seqs, ks)]
        return sum(gains), k * self.step.verify(len(seqs)), sum(kk + 1 for kk in ks)

    def depths(self, max_draft: int) -> list[int]:
        self._resume()
        return [] if self.lost else list(range(1, min(max_draft, self.max_draft) + 1))
