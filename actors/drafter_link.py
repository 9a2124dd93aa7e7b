"""The verifier's end of one session with its drafter, and what it takes from it. Every
wait is bounded (a drafter that dies or goes silent costs at most a timeout, then the
request goes on with the target alone), and every tree is checked before the target
scores it: nothing the drafter sends reaches model code unchecked. The verify loop
itself (`actors.verifying`) then only sees a tree, or `DrafterLost`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from actors.pipeline_options import Cancelled, PipelineOptions
from decoding.draft_stream import DraftStream
from decoding.tree import TokenTree, draft_fault
from protocol import (
    CandidateTree,
    Handshake,
    HandshakeRefused,
    Message,
    ModelFingerprint,
    ProtocolError,
    ReceiveTimeout,
    Role,
    RouterChannel,
    Shutdown,
)


class DrafterLost(Exception):
    """The drafter died, left, or stopped answering; the request goes on without it."""


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


def check_tree(tree: TokenTree, q: torch.Tensor | None, vocab: int) -> None:
    """Nothing from the drafter reaches the target unchecked (`draft_fault`): a bad tree
    loses the drafter; the request goes on with the target alone."""
    if (fault := draft_fault(tree.tokens.tolist(), None if q is None else tuple(q.shape), vocab)) is not None:
        raise DrafterLost(f"the drafter's tree: {fault}")


def _as_probs(draft_probs) -> torch.Tensor | None:
    if draft_probs is None:
        return None
    return torch.as_tensor(draft_probs, dtype=torch.float32)


def next_tree(link: DrafterLink, committed: list[int], step: int, opts: PipelineOptions):
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


def ready_chain(link: DrafterLink, stream: DraftStream, committed: list[int], most: int, opts: PipelineOptions):
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
