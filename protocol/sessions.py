"""Which messages a channel admits: known sessions, steps that do not go backwards.

A message for a session this side never opened (no accepted handshake, or already shut down)
or with a step older than one already admitted for its session is dropped and counted, never
handed to the application. Stale steps come from a peer that has not yet seen a rollback or a
verdict; unknown sessions from a peer that restarted, or from someone who should not be here.
"""

from __future__ import annotations

import enum

from protocol.fields import NO_SESSION
from protocol.messages import Error, Handshake, Message, Shutdown


class DropReason(str, enum.Enum):
    UNKNOWN_SESSION = "unknown_session"
    STALE_STEP = "stale_step"


class SessionTable:
    def __init__(self) -> None:
        self._last_step: dict[str, int] = {}
        # ROUTER side: the peer identity that opened the session; others may not speak for it.
        self._owner: dict[str, bytes | None] = {}

    def open(self, session_id: str, *, step: int = 0, peer: bytes | None = None) -> None:
        self._last_step[session_id] = step
        self._owner[session_id] = peer

    def close(self, session_id: str) -> None:
        self._last_step.pop(session_id, None)
        self._owner.pop(session_id, None)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._last_step

    def __len__(self) -> int:
        return len(self._last_step)

    def owner(self, session_id: str) -> bytes | None:
        return self._owner.get(session_id)

    def last_step(self, session_id: str) -> int | None:
        return self._last_step.get(session_id)

    def admit(self, message: Message, peer: bytes | None = None) -> DropReason | None:
        """None if `message` may be applied (and record its step), else why it is dropped."""
        kind = type(message)
        if kind is Handshake:
            return None  # opens sessions; the channel's handshake logic decides
        session_id = message.session_id
        if kind is Error and session_id == NO_SESSION:
            return None  # answer to bytes the peer could not decode: about the connection
        last = self._last_step.get(session_id)
        if last is None or (peer is not None and self._owner[session_id] not in (None, peer)):
            return DropReason.UNKNOWN_SESSION
        if message.step < last:
            return DropReason.STALE_STEP
        self._last_step[session_id] = message.step
        if kind is Shutdown:
            self.close(session_id)
        return None
