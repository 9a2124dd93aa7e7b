"""Ensemble members in separate actors: the leader's proxies and the members' serve loop.

The leader (one member's actor) owns the request and runs the decode loop of
`actors.ensemble`. It binds a ROUTER; every other member connects a DEALER, with its own
session id (`<session>.<index>`: a session belongs to one peer), and serves commands:

    member                                   leader
    Handshake(role=peer)             ->
                                     <-      Handshake(role=peer)
                                     <-      EnsembleCall(step, kind, position, token_ids, count)
    EnsembleRows(step, tokens, logits) ->
    ...                                      ...
                                     <-      Shutdown

Each call carries only the context that changed since the previous one (`position` is
where `token_ids` start), so per round the wire carries the new tokens one way and the
logits rows the leader needs the other. Model math stays in `actors.ensemble_member`;
this module moves messages and bounds every wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from actors.ensemble_member import MemberLost, Rows, member_seed, run_command
from actors.pipeline_options import Cancelled
from actors.runner import ModelRunner
from decoding.request import DecodeConfig, make_generator
from decoding.sampling import SamplingParams
from protocol import (
    DealerChannel,
    EnsembleCall,
    EnsembleRows,
    Error,
    Handshake,
    Message,
    ModelFingerprint,
    ProtocolError,
    ReceiveTimeout,
    Role,
    RouterChannel,
    Shutdown,
)


@dataclass(frozen=True)
class PeerOptions:
    handshake_timeout_s: float = 120.0  # longest wait for every member to join a request
    reply_timeout_s: float = 300.0  # longest wait for one member's answer
    idle_timeout_s: float = 600.0  # member: longest silence from the leader
    poll_s: float = 0.02  # how often a waiting side checks liveness and cancellation

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


MAX_EARLY = 64  # handshakes kept for requests not yet led


def member_session(session: str, index: int) -> str:
    return f"{session}.{index}"


class LeaderLink:
    """The leader's end of one request: one session per remote member, every wait bounded."""

    def __init__(self, router: RouterChannel, fingerprint: ModelFingerprint, session: str,
                 names: dict[int, str], opts: PeerOptions, alive: Callable[[int], bool],
                 cancelled: Callable[[], bool], early: dict[str, tuple] | None = None):
        """`early`: handshakes that came in on `router` for sessions no link had yet, shared
        by every request this router serves (`ModelHome.early_handshakes`)."""
        self.router, self.fingerprint, self.opts = router, fingerprint, opts
        self.names, self.alive, self.cancelled = names, alive, cancelled
        self.session = session
        self.index_of = {member_session(session, i): i for i in names}
        self.peers: dict[int, bytes] = {}
        self.inbox: dict[int, Message] = {}
        self.early = early if early is not None else {}

    def _next(self, timeout_s: float) -> tuple[bytes, Message]:
        for key in self.index_of:
            if key in self.early:
                return self.early.pop(key)
        return self.router.recv(timeout_s=timeout_s)

    def _keep_early(self, peer: bytes, message: Message) -> None:
        """A member of the next request can join while this one still holds the actor (its
        call ran first, under load): its handshake must wait for that request's link, not
        be dropped, or member and leader each wait out the handshake timeout."""
        if isinstance(message, Handshake):
            self.early[message.session_id] = (peer, message)
            while len(self.early) > MAX_EARLY:  # of requests that never came: the oldest go
                self.early.pop(next(iter(self.early)))

    def _pump(self, timeout_s: float) -> None:
        try:
            peer, message = self._next(timeout_s)
        except ReceiveTimeout:
            return
        except ProtocolError as exc:
            self.router.reply_error(exc.peer, exc)
            return
        index = self.index_of.get(message.session_id)
        if index is None:
            self._keep_early(peer, message)
            return
        if isinstance(message, Handshake):
            if self.router.answer_handshake(peer, message, role=Role.PEER, fingerprint=self.fingerprint):
                self.peers[index] = peer
            return
        if self.peers.get(index) == peer:
            self.inbox[index] = message

    def _check(self, index: int, deadline: float, what: str) -> None:
        if self.cancelled():
            raise Cancelled("request cancelled")
        if not self.alive(index):
            raise MemberLost(self.names[index], "its actor is gone")
        if time.monotonic() > deadline:
            raise MemberLost(self.names[index], f"no {what} within the time limit")

    def accept(self) -> None:
        deadline = time.monotonic() + self.opts.handshake_timeout_s
        while len(self.peers) < len(self.names):
            self._pump(self.opts.poll_s)
            for index in self.names:
                if index not in self.peers:
                    self._check(index, deadline, "handshake")

    def send(self, index: int, message: Message) -> None:
        try:
            self.router.send(self.peers[index], message)
        except ProtocolError as exc:
            raise MemberLost(self.names[index], f"cannot reach it ({exc})") from exc

    def wait(self, index: int, step: int) -> EnsembleRows:
        deadline = time.monotonic() + self.opts.reply_timeout_s
        while True:
            message = self.inbox.pop(index, None)
            if isinstance(message, Error):
                raise MemberLost(self.names[index], message.detail)
            if isinstance(message, EnsembleRows) and message.step == step:
                return message
            self._pump(self.opts.poll_s)
            if index not in self.inbox:
                self._check(index, deadline, "answer")

    def close(self, reason: str) -> None:
        for index, peer in self.peers.items():
            session = member_session(self.session, index)
            try:
                self.router.send(peer, Shutdown(session_id=session, step=2**62, reason=reason))
            except ProtocolError:
                pass
            self.router.sessions.close(session)


class RemoteMember:
    """A member in another actor, seen from the leader (`actors.ensemble_member.Member`)."""

    local = False

    def __init__(self, link: LeaderLink, index: int, name: str, session: str):
        self.link, self.index, self.name, self.session = link, index, name, member_session(session, index)
        self.sent: list[int] = []
        self.step = 0

    def begin(self, room: int, params: SamplingParams, seed: int | None) -> None:
        self.sent, self.step = [], 0  # the member resets itself on the first call

    def submit(self, kind: str, context: list[int], count: int) -> None:
        common = 0
        limit = min(len(self.sent), len(context))
        while common < limit and self.sent[common] == context[common]:
            common += 1
        self.step += 1
        self.link.send(self.index, EnsembleCall(session_id=self.session, step=self.step, kind=kind,
                                                token_ids=context[common:], position=common, count=count))
        self.sent = list(context)

    def result(self) -> Rows:
        reply = self.link.wait(self.index, self.step)
        return Rows(torch.as_tensor(reply.logits, dtype=torch.float32), list(reply.token_ids), reply.seconds)


class LeaderGone(Exception):
    """The leader stopped sending within `idle_timeout_s`."""


def serve_member(runner: ModelRunner, channel: DealerChannel, fingerprint: ModelFingerprint, session: str,
                 index: int, cfg: DecodeConfig, opts: PeerOptions,
                 cancelled: Callable[[], bool] = lambda: False) -> dict:
    """A non-leading member: answer the leader's calls until it shuts the session."""
    own = member_session(session, index)
    if cancelled():  # cancelled while this call waited for the actor: the leader is gone, do not wait on it
        raise Cancelled(session)
    channel.handshake(Handshake(session_id=own, step=0, role=Role.PEER, fingerprint=fingerprint),
                      timeout_s=opts.handshake_timeout_s)
    gen = make_generator(member_seed(cfg.seed, index))
    context: list[int] = []
    started = False
    stats = {"calls": 0, "compute_s": 0.0}
    deadline = time.monotonic() + opts.idle_timeout_s
    while True:
        if cancelled():
            raise Cancelled(session)
        try:
            message = channel.recv(timeout_s=opts.poll_s)
        except ReceiveTimeout:
            if time.monotonic() > deadline:
                raise LeaderGone(f"no word from the ensemble leader for {opts.idle_timeout_s:.0f} s") from None
            continue
        deadline = time.monotonic() + opts.idle_timeout_s
        if isinstance(message, Shutdown):
            channel.sessions.close(own)
            return stats
        if isinstance(message, Error):
            raise message.to_exception()
        if not isinstance(message, EnsembleCall):
            continue
        del context[message.position:]
        context.extend(message.token_ids)
        if not started:  # the first call holds the prompt: size the cache for this request
            runner.reset(cfg.cache_room(len(context)))
            started = True
        try:
            rows = run_command(runner, message.kind, context, message.count, cfg.sampling, gen)
        except Exception as exc:  # tell the leader now rather than let it time out
            channel.send(Error.from_exception(exc, session_id=own, step=message.step))
            raise
        stats["calls"] += 1
        stats["compute_s"] += rows.seconds
        channel.send(EnsembleRows(session_id=own, step=message.step, token_ids=rows.tokens,
                                  logits=rows.logits.contiguous(), seconds=rows.seconds))
