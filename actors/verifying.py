"""The verifier's side of a request: the target commits what it agrees with.

The verifier owns the request. It talks to one drafter over a ROUTER socket:

    drafter                                  verifier
    Handshake(session)               ->
                                     <-      Handshake(answer)
                                     <-      ContextUpdate(prompt)        (drafter prefills now)
                                     <-      ContextUpdate(first token)   (after the target's prefill)
    CandidateTree(step, position)    ->
                                     <-      Verdict(accepted path, next token)
    ...                                      ...
                                     <-      Shutdown

sync: one tree per round; the drafter waits for each verdict before drafting again.
async: the drafter streams its speculation (bounded by `lookahead`) while the target
verifies; the verifier verifies whatever has arrived (`decoding.draft_stream`).

Why async stays lossless, greedy and sampling alike: every draft the target sees was drawn
from the draft distribution q sent with it, conditioned on exactly the tokens before it,
and with the drafter's own coins. How many drafts a verify takes depends only on timing,
never on the target's coins for that verify. Rejection sampling with q (Leviathan et al.)
then yields the target's distribution for any such stopping rule. After a verify, drafts
beyond it are kept only if the token the target committed equals the drafter's own token
at that position; the drafts after it were drawn conditioned on that very token, so they
are valid proposals for the next verify. Otherwise both sides drop them (the drafter
"rolls back": it crops its KV cache to the committed length). Under greedy this is AMUSD.

If the drafter dies or goes silent, the request continues target-only: same output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from actors.runner import ModelRunner
from decoding.acceptance import verify_greedy, verify_sampling, verify_sampling_point_mass
from decoding.draft_stream import DraftStream
from decoding.request import (
    DecodeConfig,
    GenerationResult,
    GenerationStats,
    OutputBuffer,
    TokenSink,
    make_generator,
    next_token,
)
from decoding.sampling import logits_to_probs
from decoding.tree import TokenTree, draft_fault
from protocol import (
    CandidateTree,
    ContextUpdate,
    Handshake,
    HandshakeRefused,
    Message,
    ModelFingerprint,
    ProtocolError,
    ReceiveTimeout,
    Role,
    RouterChannel,
    Shutdown,
    Verdict,
)

log = logging.getLogger(__name__)

MODES = ("sync", "async")


@dataclass(frozen=True)
class PipelineOptions:
    mode: str = "sync"
    lookahead: int = 8  # async: most unverified drafts the drafter holds, and per verify
    handshake_timeout_s: float = 60.0  # longest wait for the drafter to join a request
    draft_timeout_s: float = 60.0  # longest silence from a drafter before going target-only
    verdict_timeout_s: float = 300.0  # drafter: longest wait for the verifier
    poll_s: float = 0.02  # how often a waiting side checks liveness and cancellation
    heads: bool = False  # the drafter is draft heads: send it the target's hidden states (sync only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"pipeline mode must be one of {MODES}, got {self.mode!r}")
        if self.heads and self.mode != "sync":
            raise ValueError("draft heads run with the sync pipeline: each tree needs the verdict's hidden state")
        if not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {self.lookahead!r}")
        for name in ("handshake_timeout_s", "draft_timeout_s", "verdict_timeout_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class DrafterLost(Exception):
    """The drafter died, left, or stopped answering; the request goes on without it."""


class Cancelled(Exception):
    """The caller gave up on this request."""


class DrafterLink:
    """The verifier's end of one session. Every wait is bounded: it returns a message, or
    raises DrafterLost / Cancelled."""

    def __init__(self, router: RouterChannel, fingerprint: ModelFingerprint, session: str,
                 opts: PipelineOptions, drafter_alive: Callable[[], bool], cancelled: Callable[[], bool]):
        self.router, self.fingerprint, self.session, self.opts = router, fingerprint, session, opts
        self.drafter_alive, self.cancelled = drafter_alive, cancelled
        self.peer: bytes | None = None
        self.lost = False
        self.wait_s = 0.0

    def _recv(self, timeout_s: float) -> Message | None:
        try:
            peer, message = self.router.recv(timeout_s=timeout_s)
        except ReceiveTimeout:
            return None
        except ProtocolError as exc:  # undecodable bytes: say so, keep serving
            self.router.reply_error(exc.peer, exc)
            return None
        if message.session_id != self.session:
            if isinstance(message, Handshake):  # a drafter for a request that is over
                self.router.reply_error(peer, HandshakeRefused(f"no open request {message.session_id}"), message)
            return None
        if isinstance(message, Handshake):
            self.router.answer_handshake(peer, message, role=Role.VERIFIER, fingerprint=self.fingerprint)
            self.peer = peer
            return None
        if peer != self.peer:
            return None
        return message

    def wait(self, timeout_s: float) -> Message:
        """The next message of this session; blocks up to `timeout_s` while the drafter lives."""
        start = time.perf_counter()
        deadline = start + timeout_s
        try:
            while True:
                if self.cancelled():
                    raise Cancelled(self.session)
                message = self._recv(self.opts.poll_s)
                if message is not None:
                    return message
                if not self.drafter_alive():
                    raise DrafterLost("the drafter process is gone")
                if time.perf_counter() > deadline:
                    raise DrafterLost(f"no word from the drafter for {timeout_s:.0f} s")
        finally:
            self.wait_s += time.perf_counter() - start

    def poll(self) -> Message | None:
        return self._recv(0)

    def accept(self) -> None:
        deadline = time.perf_counter() + self.opts.handshake_timeout_s
        while self.peer is None:
            if self.cancelled():
                raise Cancelled(self.session)
            self._recv(self.opts.poll_s)
            if self.peer is None and (not self.drafter_alive() or time.perf_counter() > deadline):
                raise DrafterLost("the drafter never joined the request")

    def send(self, message: Message) -> None:
        if self.peer is not None and not self.lost:
            try:
                self.router.send(self.peer, message)
            except ProtocolError as exc:
                raise DrafterLost(f"cannot reach the drafter: {exc}") from exc

    def drop(self, step: int, reason: str) -> None:
        """Go on without the drafter: tell it to stop, if it still listens (it may be alive
        and merely wrong, as when it sent a bad tree), and read nothing more from it."""
        if self.peer is not None and not self.lost:
            try:
                self.router.send(self.peer, Shutdown(session_id=self.session, step=step, reason=reason))
            except ProtocolError:
                pass
        self.lost = True

    def close(self, step: int, reason: str) -> None:
        self.drop(step, reason)
        self.router.sessions.close(self.session)


def _check_tree(tree: TokenTree, q: torch.Tensor | None, vocab: int) -> None:
    """Nothing from the drafter reaches the target unchecked (`draft_fault`): a bad tree
    loses the drafter; the request goes on with the target alone."""
    if (fault := draft_fault(tree.tokens.tolist(), None if q is None else tuple(q.shape), vocab)) is not None:
        raise DrafterLost(f"the drafter's tree: {fault}")


def _as_probs(draft_probs) -> torch.Tensor | None:
    if draft_probs is None:
        return None
    return torch.as_tensor(draft_probs, dtype=torch.float32)


def verify_request(
    runner: ModelRunner,
    router: RouterChannel,
    fingerprint: ModelFingerprint,
    session: str,
    prompt: list[int],
    cfg: DecodeConfig,
    opts: PipelineOptions,
    drafter_alive: Callable[[], bool] = lambda: True,
    cancelled: Callable[[], bool] = lambda: False,
    on_tokens: TokenSink | None = None,
) -> GenerationResult:
    stats, out, gen = GenerationStats(), OutputBuffer(cfg, on_tokens), make_generator(cfg.seed)
    start = time.perf_counter()
    link = DrafterLink(router, fingerprint, session, opts, drafter_alive, cancelled)
    runner.reset(cfg.cache_room(len(prompt), opts.lookahead))
    step = 0
    try:
        if not drafter_alive():  # none was asked (speculation off) or none is up: no warning
            raise DrafterLost("")
        link.accept()
        link.send(ContextUpdate(session_id=session, step=step, token_ids=prompt, position=0, is_prompt=True))
    except DrafterLost as exc:
        if str(exc):
            log.warning("session %s: %s; decoding with the target alone", session, exc)
        link.lost = stats.drafter_lost = True
    hidden, logits = runner.feed_hidden(prompt)
    out.extend([next_token(logits, cfg.sampling, gen)])
    stats.target_forwards = 1
    stream = DraftStream()
    try:
        link.send(ContextUpdate(session_id=session, step=step, token_ids=out.tokens[:1], position=len(prompt),
                                hidden=hidden.float() if opts.heads else None))
        while not out.done:
            if cancelled():
                raise Cancelled(session)
            committed = prompt + out.tokens
            # The async drafter never drafts the last token: the target makes it anyway.
            if link.lost or (opts.mode == "async" and out.remaining == 1):
                logits = runner.feed(runner.sync(committed[:-1]) + committed[-1:])
                out.extend([next_token(logits, cfg.sampling, gen)])
                stats.target_forwards += 1
                continue
            try:
                if opts.mode == "sync":
                    tree, q = _next_tree(link, committed, step, opts)
                else:
                    tree, q = _ready_chain(link, stream, committed,
                                           min(opts.lookahead, max(1, out.remaining - 1)), opts)
                _check_tree(tree, q, runner.vocab_size)
            except (DrafterLost, ProtocolError) as exc:
                log.warning("session %s: %s; finishing with the target alone", session, exc)
                link.drop(step, f"dropped: {exc}"[:200])
                stats.drafter_lost = True
                continue
            verify_start = time.perf_counter()
            states = runner.score_tree_hidden(committed, tree)
            logits = runner.model.logits(states)
            if cfg.sampling.greedy:
                verdict = verify_greedy(tree, logits)
            elif opts.heads:  # the heads' top-k: distinct, deterministic candidates
                verdict = verify_sampling_point_mass(tree, logits_to_probs(logits, cfg.sampling), gen)
            else:
                verdict = verify_sampling(tree, logits_to_probs(logits, cfg.sampling), q, gen)
            runner.commit_path(tree, verdict.accepted)
            stats.verify_s += time.perf_counter() - verify_start
            new = tree.tokens[verdict.accepted].tolist() + [verdict.next_token]
            out.extend(new)
            step += 1
            stats.target_forwards += 1
            stats.verify_rounds += 1
            stats.drafted_tokens += tree.size - 1
            stats.accepted_tokens += len(verdict.accepted)
            if opts.mode == "async":
                stream.advance(len(verdict.accepted), verdict.next_token)
            try:
                link.send(Verdict(session_id=session, step=step, accepted_path=verdict.accepted,
                                  bonus_token_id=verdict.next_token, committed_length=len(committed) + len(new),
                                  hidden=states[verdict.last_node].float() if opts.heads else None))
            except DrafterLost as exc:
                log.warning("session %s: %s; finishing with the target alone", session, exc)
                link.lost = stats.drafter_lost = True
    finally:
        link.close(step, "done")
    stats.wait_s = link.wait_s
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)


def _next_tree(link: DrafterLink, committed: list[int], step: int, opts: PipelineOptions):
    """sync: the drafter's tree for this round, rooted at the newest committed token."""
    while True:
        message = link.wait(opts.draft_timeout_s)
        if not isinstance(message, CandidateTree) or message.step < step:
            continue
        if message.position != len(committed) - 1 or message.token_ids[0] != committed[-1]:
            raise DrafterLost(f"the drafter's tree at position {message.position} does not extend the "
                              f"{len(committed)} committed tokens")
        tree = TokenTree(torch.tensor(message.token_ids), torch.tensor(message.parents))
        return tree, _as_probs(message.draft_probs)


def _ready_chain(link: DrafterLink, stream: DraftStream, committed: list[int], most: int, opts: PipelineOptions):
    """async: every draft that has arrived (at most `most`); waits only if there is none."""
    def absorb(message: Message | None) -> None:
        if isinstance(message, CandidateTree) and message.position is not None:
            q = _as_probs(message.draft_probs)
            if q is not None and (q.dim() != 2 or len(q) < len(message.token_ids) - 1):
                raise DrafterLost(f"the drafter's probabilities have shape {tuple(q.shape)} for "
                                  f"{len(message.token_ids)} tokens")
            stream.absorb(committed, message.step, message.position, message.token_ids, q)

    while (message := link.poll()) is not None:
        absorb(message)
    while len(stream) == 0:
        absorb(link.wait(opts.draft_timeout_s))
    tokens, q_rows = stream.take(most)
    tree = TokenTree.chain(committed[-1], tokens)
    q = None
    if q_rows[0] is not None:
        q = torch.zeros(len(tokens) + 1, q_rows[0].shape[-1])
        for i, row in enumerate(q_rows):
            if row is None or row.shape[-1] != q.shape[-1]:
                raise DrafterLost(f"the drafter's probability rows differ in width ({row.shape[-1]}, {q.shape[-1]})")
            q[i] = row
    return tree, q
