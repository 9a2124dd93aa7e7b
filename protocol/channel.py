"""ZeroMQ DEALER/ROUTER channels (blocking; each runs on its own thread).

The verifier binds a ROUTER (one socket serves many drafters, each reply is addressed by the
peer's identity); each drafter connects a DEALER. DEALER/ROUTER rather than REQ/REP because
either side may send several messages in a row (context update then tree, heartbeats) and
REQ/REP would lock them into strict alternation.

Every receive has a timeout. High-water marks bound both queues: when a slow peer lets its
queue fill, `send` waits up to `send_timeout_s` and then raises `Backpressure`; memory never
grows without bound. The ROUTER is "mandatory" so a reply to a vanished peer raises
`PeerUnreachable` instead of disappearing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq

from protocol.auth import Auth, CurveClient, CurveServer, SharedSecret, apply_curve_client, apply_curve_server
from protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, INLINE_TENSOR_LIMIT, TensorLib, decode, encode
from protocol.endpoints import is_loopback, is_wildcard
from protocol.errors import (
    Backpressure,
    ChannelClosed,
    ErrorCode,
    HandshakeRefused,
    PeerUnreachable,
    ProtocolError,
    ReceiveTimeout,
)
from protocol.identity import ModelFingerprint, Role
from protocol.messages import Error, Handshake, Message
from protocol.sessions import DropReason, SessionTable

log = logging.getLogger(__name__)


BINDING_RECV_HWM = 16  # x max_message_bytes: what one peer can make a binding socket hold


@dataclass(frozen=True)
class ChannelConfig:
    recv_timeout_s: float = 30.0  # default for every receive; each call may pass its own
    send_timeout_s: float = 30.0  # how long a send may wait at the high-water mark
    send_hwm: int = 64  # messages queued towards the peer before send blocks
    # messages queued from each peer before zmq stops reading its socket (TCP then pushes
    # back); None: 16 on a binding socket, whose memory every peer shares, 64 on a connecting one
    recv_hwm: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    linger_s: float = 1.0  # how long close() may wait to flush queued messages
    tensor_lib: TensorLib = "numpy"  # what received tensors decode into
    auth: Auth | None = None  # None: no authentication (fine on one machine / ipc)
    allow_any_interface: bool = False  # binding tcp://* must be asked for explicitly
    # ZMTP-level pings so a dead peer's connection is dropped (and a DEALER reconnects) even
    # while the application is idle; None turns them off.
    connection_heartbeat_s: float | None = 5.0

    def __post_init__(self) -> None:
        if self.recv_timeout_s < 0 or self.send_timeout_s < 0:
            raise ValueError("timeouts must be >= 0")
        if self.send_hwm < 1 or (self.recv_hwm is not None and self.recv_hwm < 1):
            raise ValueError("high-water marks must be >= 1 (0 would mean unbounded)")
        if self.tensor_lib not in ("numpy", "torch"):
            raise ValueError(f"tensor_lib must be 'numpy' or 'torch', not {self.tensor_lib!r}")


@dataclass
class ChannelStats:
    messages_sent: int = 0
    messages_received: int = 0  # admitted and handed to the application
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped_unknown_session: int = 0
    dropped_stale_step: int = 0
    protocol_errors: int = 0  # messages that failed to decode
    handler_errors: int = 0  # admitted messages whose handling raised a ProtocolError
    handshakes_refused: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)


class _ChannelCore:
    """What both ends share: socket setup, codec, session admission."""

    def __init__(self, socket: zmq.Socket, config: ChannelConfig, sessions: SessionTable | None) -> None:
        self.config = config
        self.sessions = sessions if sessions is not None else SessionTable()
        self.stats = ChannelStats()
        self._socket = socket
        self._secret = config.auth if isinstance(config.auth, SharedSecret) else None
        self._rcvtimeo_ms = -2  # cache: setsockopt only when the timeout changes
        self._closed = False
        socket.sndhwm = config.send_hwm
        binds = socket.type == zmq.ROUTER
        socket.rcvhwm = config.recv_hwm if config.recv_hwm is not None else (BINDING_RECV_HWM if binds else 64)
        socket.linger = int(config.linger_s * 1000)
        socket.sndtimeo = int(config.send_timeout_s * 1000)
        # send(copy=False) still copies frames under this size (cheaper than tracking them);
        # pin it to the codec's inline limit so every tensor frame goes without a copy.
        socket.copy_threshold = INLINE_TENSOR_LIMIT
        # libzmq drops the connection of a peer sending a larger frame: memory stays bounded
        # even before our own check (which covers the sum of all frames) runs.
        socket.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        if config.connection_heartbeat_s:
            interval_ms = int(config.connection_heartbeat_s * 1000)
            socket.heartbeat_ivl = interval_ms
            socket.heartbeat_timeout = 3 * interval_ms
            socket.heartbeat_ttl = 3 * interval_ms

    # -- codec and admission ------------------------------------------------------------------

    def _encode(self, message: Message) -> list:
        return encode(message, secret=self._secret, max_message_bytes=self.config.max_message_bytes)

    def _decode(self, frames: Sequence[zmq.Frame], peer: bytes | None) -> Message:
        self.stats.bytes_received += sum(map(len, frames))
        try:
            return decode(frames, secret=self._secret, max_message_bytes=self.config.max_message_bytes,
                          tensor_lib=self.config.tensor_lib)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            name = type(exc).__name__
            self.stats.errors_by_type[name] = self.stats.errors_by_type.get(name, 0) + 1
            exc.peer = peer
            raise

    def _admit(self, message: Message, peer: bytes | None) -> bool:
        reason = self.sessions.admit(message, peer)
        if reason is None:
            self.stats.messages_received += 1
            return True
        if reason is DropReason.UNKNOWN_SESSION:
            self.stats.dropped_unknown_session += 1
        else:
            self.stats.dropped_stale_step += 1
        log.debug("dropped %s for session %s step %d: %s", type(message).__name__,
                  message.session_id, message.step, reason.value)
        return False

    def _count_sent(self, frames: list) -> None:
        self.stats.messages_sent += 1
        self.stats.bytes_sent += sum(map(len, frames))

    # -- timeouts -----------------------------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.config.recv_timeout_s if timeout_s is None else timeout_s)

    def _arm_receive(self, deadline: float, first_try: bool) -> None:
        """Set RCVTIMEO to the time left; raise ReceiveTimeout once it is spent."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        remaining = deadline - time.monotonic()
        if remaining <= 0 and not first_try:
            raise ReceiveTimeout("no message before the receive timeout")
        timeout_ms = max(0, math.ceil(remaining * 1000))
        if timeout_ms != self._rcvtimeo_ms:
            self._socket.rcvtimeo = timeout_ms
            self._rcvtimeo_ms = timeout_ms

    # -- handshake, shared by both ROUTER flavours ----------------------------------------------

    def _handshake_answer(self, peer: bytes, hello: Handshake, role: Role,
                          fingerprint: ModelFingerprint) -> tuple[Message, bool]:
        mine = Handshake(session_id=hello.session_id, step=hello.step, role=role, fingerprint=fingerprint)
        reason = mine.refusal_reason(hello)
        owner = self.sessions.owner(hello.session_id)
        if reason is None and hello.session_id in self.sessions and owner not in (None, peer):
            reason = "session id already in use by another peer"
        if reason is not None:
            self.stats.handshakes_refused += 1
            return Error(session_id=hello.session_id, step=hello.step,
                         code=ErrorCode.HANDSHAKE_REFUSED, detail=reason), False
        self.sessions.open(hello.session_id, step=hello.step, peer=peer)
        return mine, True

    def _check_handshake_reply(self, hello: Handshake, reply: Message) -> Handshake:
        if isinstance(reply, Error):
            self.sessions.close(hello.session_id)
            raise reply.to_exception()
        reason = (hello.refusal_reason(reply) if isinstance(reply, Handshake)
                  else f"expected a handshake, got {type(reply).__name__}")
        if reason is not None:
            self.sessions.close(hello.session_id)
            raise HandshakeRefused(reason)
        return reply

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _configure_dealer(socket: zmq.Socket, endpoint: str, config: ChannelConfig) -> None:
    if isinstance(config.auth, CurveServer):
        raise ValueError("a connecting (DEALER) channel takes CurveClient, not CurveServer")
    if isinstance(config.auth, CurveClient):
        apply_curve_client(socket, config.auth)
    socket.connect(endpoint)


def _configure_router(socket: zmq.Socket, endpoint: str, config: ChannelConfig) -> str:
    if is_wildcard(endpoint) and not config.allow_any_interface:
        raise ValueError(f"refusing to bind {endpoint} on all interfaces; bind the node's own "
                         "address (or set allow_any_interface=True)")
    if isinstance(config.auth, CurveClient):
        raise ValueError("a binding (ROUTER) channel takes CurveServer, not CurveClient")
    if isinstance(config.auth, CurveServer):
        apply_curve_server(socket, config.auth)
    elif config.auth is None and not is_loopback(endpoint):
        log.warning("binding %s without authentication; set ChannelConfig.auth on clusters", endpoint)
    socket.router_mandatory = 1  # unroutable replies raise instead of vanishing
    socket.bind(endpoint)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _send_error(exc: zmq.ZMQError) -> ProtocolError:
    if isinstance(exc, zmq.Again):
        return Backpressure("peer queue full for the whole send timeout")
    if exc.errno == zmq.EHOSTUNREACH:
        return PeerUnreachable("no connected peer with that identity")
    if exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
        return ChannelClosed(str(exc))
    return ProtocolError(f"send failed: {exc}")


# =============================================================================================
# blocking


ALIVE_POLL_S = 0.5  # DealerChannel.recv(alive=...): how often a waiting receive asks after its peer


class DealerChannel(_ChannelCore):
    """Connecting side (drafter). Blocking API."""

    def __init__(self, endpoint: str, *, config: ChannelConfig | None = None,
                 context: zmq.Context | None = None, sessions: SessionTable | None = None) -> None:
        config = config or ChannelConfig()
        socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        super().__init__(socket, config, sessions)
        try:
            _configure_dealer(socket, endpoint, config)
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
            raise _send_error(exc) from None
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


class RouterChannel(_ChannelCore):
    """Binding side (verifier), serving any number of peers. Blocking API."""

    def __init__(self, endpoint: str, *, config: ChannelConfig | None = None,
                 context: zmq.Context | None = None, sessions: SessionTable | None = None) -> None:
        config = config or ChannelConfig()
        socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        super().__init__(socket, config, sessions)
        try:
            self.endpoint = _configure_router(socket, endpoint, config)  # actual port filled in
        except BaseException:
            socket.close(linger=0)
            raise

    def send(self, peer: bytes, message: Message, *, track: bool = False) -> zmq.MessageTracker | None:
        frames = self._encode(message)
        try:
            tracker = self._socket.send_multipart([peer, *frames], copy=False, track=track)
        except zmq.ZMQError as exc:
            raise _send_error(exc) from None
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
