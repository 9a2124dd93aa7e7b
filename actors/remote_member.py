"""An ensemble member in another process, as the batched `EnsembleVerifier` sees it.

Each round the verifier `submit`s every sequence's context (committed tokens, then the
proposer's chain) and, after computing its own members, `gather`s this member's logits
rows: the member (`actors/member_server.py`) scores the whole batch in one forward of its
own meanwhile, on its own device. Per sequence only the tokens the member does not hold
yet cross the link one way, and the asked-for rows come back as one tensor frame.

A member that fails or stops answering cannot be decoded around (the ensemble's output
needs every member), so the round fails with `MemberLost` and `lost` says why; the
engine's health then reports it, and Serve replaces the replica, which starts new actors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from actors.ensemble_member import MemberLost
from decoding.sequence import Sequence
from protocol import (
    DealerChannel,
    EnsembleCall,
    EnsembleRows,
    Error,
    Handshake,
    ModelFingerprint,
    ProtocolError,
    Role,
    Shutdown,
)


@dataclass
class _Sent:
    tokens: list[int] = field(default_factory=list)  # the context the member holds for the sequence
    settled: int = 0  # its leading tokens that are committed, so never change


class RemoteMember:
    def __init__(self, channel: DealerChannel, fingerprint: ModelFingerprint, name: str, timeout_s: float = 300.0,
                 alive: Callable[[], bool] | None = None, on_close: Callable[[], None] | None = None,
                 info: dict | None = None):
        """`alive`: False once the member's process is known gone (checked while waiting);
        `on_close`: what stops the member's side (its actor); `info`: its runtime, for /health."""
        self.channel, self.fingerprint, self.name, self.timeout_s = channel, fingerprint, name, timeout_s
        self.alive, self.on_close, self.info = alive, on_close, info or {}
        self.sent: dict[str, _Sent] = {}
        self.rounds = 0
        self.asked: list[str] = []  # the sessions of the round in flight
        self.lost: str | None = None

    def attach(self, seq: Sequence) -> None:
        self._guard(lambda: self.channel.handshake(
            Handshake(session_id=seq.id, step=0, role=Role.PEER, fingerprint=self.fingerprint),
            self.timeout_s, self.alive))
        self.sent[seq.id] = _Sent()

    def free(self, seq: Sequence) -> None:
        if self.sent.pop(seq.id, None) is not None and self.lost is None:
            self._guard(lambda: self.channel.send(Shutdown(session_id=seq.id, step=self.rounds + 1,
                                                           reason="finished")))

    def submit(self, kind: str, contexts: list[tuple[str, list[int], int]]) -> None:
        """For each (sequence, context, count): the logits after each of the context's last
        `count` tokens ("prefill": the context ends with a prompt chunk). Sends only."""
        self.rounds += 1
        self.asked = [sid for sid, _, _ in contexts]
        for sid, context, count in contexts:
            sent = self.sent[sid]
            position = sent.settled
            limit = min(len(sent.tokens), len(context))
            while position < limit and sent.tokens[position] == context[position]:
                position += 1
            call = EnsembleCall(session_id=sid, step=self.rounds, kind=kind, token_ids=context[position:],
                                position=position, count=count, batch=len(contexts))
            self._guard(lambda: self.channel.send(call))
            sent.tokens, sent.settled = list(context), len(context) - count

    def gather(self) -> list[torch.Tensor]:
        """The rows of the round in flight, in the order asked: [count, V] float32 each."""
        got: dict[str, torch.Tensor] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < len(self.asked):
            message = self._guard(lambda: self.channel.recv(max(0.0, deadline - time.monotonic()), self.alive))
            if isinstance(message, Error):
                self._fail(f"{message.code}: {message.detail}")
            if not isinstance(message, EnsembleRows) or message.step != self.rounds or message.session_id in got \
                    or message.session_id not in self.sent:
                self._fail(f"answered {type(message).__name__} ({message.session_id}, step {message.step}) "
                           f"to round {self.rounds}")
            got[message.session_id] = torch.as_tensor(message.logits)
        return [got[sid] for sid in self.asked]

    def _guard(self, call: Callable):
        if self.lost is not None:
            raise MemberLost(self.name, self.lost)
        try:
            return call()
        except (ProtocolError, RuntimeError) as exc:
            if isinstance(exc, MemberLost):
                raise
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, why: str) -> None:
        self.lost = why
        raise MemberLost(self.name, why)

    def close(self) -> None:
        self.channel.close()
        if self.on_close is not None:
            self.on_close()
