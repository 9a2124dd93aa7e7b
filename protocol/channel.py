"""ZeroMQ DEALER/ROUTER channels (blocking; each runs on its own thread).

The verifier binds a ROUTER (one socket serves many drafters, each reply is addressed by the
peer's identity); each drafter connects a DEALER. DEALER/ROUTER rather than REQ/REP because
either side may send several messages in a row (context update then tree, heartbeats) and
REQ/REP would lock them into strict alternation.

Every receive has a timeout. High-water marks bound both queues: when a slow peer lets its
queue fill, `send` waits up to `send_timeout_s` and then raises `Backpressure`; memory never
grows without bound. The ROUTER is "mandatory" so a reply to a vanished peer raises
`PeerUnreachable` instead of disappearing. Those rules, shared by both ends, and the
config that sets them live in `channel_core.py`; this file is what each end does with them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import zmq

from protocol.channel_core import ChannelConfig, ChannelCore, configure_dealer, configure_router, send_error
from protocol.errors import ChannelClosed, PeerUnreachable, ProtocolError, ReceiveTimeout
from protocol.identity import ModelFingerprint, Role
from protocol.messages import Error, Handshake, Message
from protocol.sessions import SessionTable

log = logging.getLogger(__name__)


ALIVE_POLL_S = 0.5  # DealerChannel.recv(alive=...): how often a waiting receive asks after its peer


class DealerChannel(ChannelCore):
    """Connecting side (drafter). Blocking API."""

    def __init__(self, endpoint: str, *, config: ChannelConfig | None = None,
                 context: zmq.Context | None = None, sessions: SessionTable | None = None) -> None:
        config = config or ChannelConfig()
        socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        super().__init__(socket, config, sessions)
        try:
            configure_dealer(socket, endpoint, config)
        except BaseException:
            socket.close(linger=0)
            raise
        self.endpoint = endpoint

    def send(self, message: Message, *, track: bool = False) -> zmq.MessageTracker | None:
        """Queue `message`. With `track=True`, returns a tracker that is done once zmq no
        longer needs the tensor memory (until then, do not modify it)."""
        frames = self._encode(message)
        try:
            tracker = self._socket.send_multipart(frames, copy=False, track=track)
        except zmq.ZMQError as exc:
            raise send_error(exc) from None
        self._count_sent(frames)
        return tracker

    def recv(self, timeout_s: float | None = None, alive: Callable[[], bool] | None = None) -> Message:
        """Next admitted message. Raises ReceiveTimeout, or a ProtocolError for bad input
        (the channel stays usable: call recv again). `alive`: asked between waits of at most
        ALIVE_POLL_S; once it answers False (the peer's process is known gone) PeerUnreachable
        is raised at once instead of waiting out the timeout for an answer that cannot come."""
        if alive is not None:
            return self._recv_while(alive, timeout_s)
        deadline = self._deadline(timeout_s)
        first_try = True
        while True:
            self._arm_receive(deadline, first_try)
            first_try = False
            try:
                frames = self._socket.recv_multipart(copy=False)
            except zmq.Again:
                raise ReceiveTimeout("no message before the receive timeout") from None
            except zmq.ZMQError as exc:
                raise ChannelClosed(str(exc)) from None
            message = self._decode(frames, None)
            if self._admit(message, None):
                return message

    def _recv_while(self, alive: Callable[[], bool], timeout_s: float | None) -> Message:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self.recv(ALIVE_POLL_S if left is None else min(left, ALIVE_POLL_S))
            except ReceiveTimeout:
                if left is not None and left <= ALIVE_POLL_S:
                    raise
                if not alive():
                    raise PeerUnreachable("the peer's process is gone") from None

    def request(self, message: Message, timeout_s: float | None = None,
                alive: Callable[[], bool] | None = None) -> Message:
        self.send(message)
        return self.recv(timeout_s, alive)

    def handshake(self, hello: Handshake, timeout_s: float | None = None,
                  alive: Callable[[], bool] | None = None) -> Handshake:
        """Open `hello.session_id` with the peer; raises HandshakeRefused if it will not talk
        to us (other version, other model fingerprint, same role)."""
        self.sessions.open(hello.session_id, step=hello.step)  # so its answer is admitted
        try:
            reply = self.request(hello, timeout_s, alive)
        except BaseException:
            self.sessions.close(hello.session_id)
            raise
        return self._check_handshake_reply(hello, reply)


Handler = Callable[[bytes, Message], "Message | Sequence[Message] | None"]


class RouterChannel(ChannelCore):
    """Binding side (verifier), serving any number of peers. Blocking API."""

    def __init__(self, endpoint: str, *, config: ChannelConfig | None = None,
                 context: zmq.Context | None = None, sessions: SessionTable | None = None) -> None:
        config = config or ChannelConfig()
        socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        super().__init__(socket, config, sessions)
        try:
            self.endpoint = configure_router(socket, endpoint, config)  # actual port filled in
        except BaseException:
            socket.close(linger=0)
            raise

    def send(self, peer: bytes, message: Message, *, track: bool = False) -> zmq.MessageTracker | None:
        frames = self._encode(message)
        try:
            tracker = self._socket.send_multipart([peer, *frames], copy=False, track=track)
        except zmq.ZMQError as exc:
            raise send_error(exc) from None
        self._count_sent(frames)
        return tracker

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, Message]:
        """(peer identity, next admitted message). A ProtocolError carries `.peer`."""
        deadline = self._deadline(timeout_s)
        first_try = True
        while True:
            self._arm_receive(deadline, first_try)
            first_try = False
            try:
                peer, *frames = self._socket.recv_multipart(copy=False)
            except zmq.Again:
                raise ReceiveTimeout("no message before the receive timeout") from None
            except zmq.ZMQError as exc:
                raise ChannelClosed(str(exc)) from None
            peer = peer.bytes
            message = self._decode(frames, peer)
            if self._admit(message, peer):
                return peer, message

    def answer_handshake(self, peer: bytes, hello: Handshake, *, role: Role,
                         fingerprint: ModelFingerprint) -> bool:
        """Accept (open the session, answer with our handshake) or refuse with an Error."""
        answer, accepted = self._handshake_answer(peer, hello, role, fingerprint)
        self.send(peer, answer)
        return accepted

    def reply_error(self, peer: bytes | None, exc: ProtocolError, message: Message | None = None) -> None:
        """Tell `peer` what was wrong with its message (best effort: it may be gone)."""
        if peer is None:
            return
        where = {} if message is None else {"session_id": message.session_id, "step": message.step}
        try:
            self.send(peer, Error.from_exception(exc, **where))
        except ProtocolError as send_exc:
            log.debug("could not report %r to peer: %r", exc, send_exc)

    def serve(self, handler: Handler, *, role: Role, fingerprint: ModelFingerprint,
              should_stop: Callable[[], bool] = lambda: False, poll_s: float = 0.1,
              after_replies: Callable[[], None] | None = None) -> None:
        """Receive loop until `should_stop()` or close: answers handshakes itself, hands other
        admitted messages to `handler(peer, message)` and sends back what it returns. Bad
        input, and ProtocolErrors raised by the handler, are answered with an Error message;
        the loop keeps serving. `after_replies()` runs once a handler's replies are sent:
        work the peer should not wait for (a drafter drafting ahead while it verifies)."""
        while not should_stop():
            try:
                peer, message = self.recv(timeout_s=poll_s)
            except ReceiveTimeout:
                continue
            except ChannelClosed:
                return
            except ProtocolError as exc:  # undecodable: we cannot know its session
                self.reply_error(exc.peer, exc)
                continue
            try:
                if isinstance(message, Handshake):
                    self.answer_handshake(peer, message, role=role, fingerprint=fingerprint)
                else:
                    replies = _as_replies(handler(peer, message))
                    for reply in replies:
                        self.send(peer, reply)
                    if replies and after_replies is not None:
                        after_replies()
            except ChannelClosed:
                return
            except ProtocolError as exc:
                self.stats.handler_errors += 1
                log.warning("%s step %d from peer failed: %r", type(message).__name__, message.step, exc)
                self.reply_error(peer, exc, message)


def _as_replies(replies: "Message | Sequence[Message] | None") -> Sequence[Message]:
    if replies is None:
        return ()
    if isinstance(replies, Message):
        return (replies,)
    return replies
