"""What both ends of a channel share, so the DEALER and the ROUTER (`channel.py`) cannot
drift apart on the rules that keep a peer from hurting us: bounded queues and message
sizes, receive deadlines, session admission, handshake checks, and which authentication
each side of a bind may take. Also the config that sets those bounds and the counters
that show them at work.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
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


class ChannelCore:
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

    def waiting(self) -> bool:
        """A message is ready to be received (it stays queued). From the socket's own thread."""
        return not self._closed and bool(self._socket.poll(0, zmq.POLLIN))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def configure_dealer(socket: zmq.Socket, endpoint: str, config: ChannelConfig) -> None:
    if isinstance(config.auth, CurveServer):
        raise ValueError("a connecting (DEALER) channel takes CurveClient, not CurveServer")
    if isinstance(config.auth, CurveClient):
        apply_curve_client(socket, config.auth)
    socket.connect(endpoint)


def configure_router(socket: zmq.Socket, endpoint: str, config: ChannelConfig) -> str:
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


def send_error(exc: zmq.ZMQError) -> ProtocolError:
    if isinstance(exc, zmq.Again):
        return Backpressure("peer queue full for the whole send timeout")
    if exc.errno == zmq.EHOSTUNREACH:
        return PeerUnreachable("no connected peer with that identity")
    if exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
        return ChannelClosed(str(exc))
    return ProtocolError(f"send failed: {exc}")
