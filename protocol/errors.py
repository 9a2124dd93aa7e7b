"""Typed protocol errors.

Every way a peer's bytes can be wrong maps to exactly one subclass of `ProtocolError`, so a
receive loop can catch that one base class, report the problem back to the peer with an
`Error` message (the `code` travels on the wire) and keep serving. Nothing outside this
hierarchy should escape the decoder, whatever the input (the fuzz test holds us to that).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Wire codes for `Error` messages; one per error class below."""

    PROTOCOL = 1
    MALFORMED = 2
    MESSAGE_TOO_LARGE = 3
    UNKNOWN_MESSAGE_TYPE = 4
    VERSION_MISMATCH = 5
    TENSOR_MISMATCH = 6
    INVALID_MESSAGE = 7
    INVALID_TREE = 8
    AUTHENTICATION = 9
    HANDSHAKE_REFUSED = 10
    TIMEOUT = 11
    BACKPRESSURE = 12
    PEER_UNREACHABLE = 13
    CHANNEL_CLOSED = 14
    REMOTE = 15  # the application on the other side failed; detail says how


class ProtocolError(Exception):
    """Base of every error this package raises about messages, peers or the channel."""

    code: ErrorCode = ErrorCode.PROTOCOL

    def __init__(self, detail: str = "", *, peer: bytes | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # ROUTER side: identity of the peer whose message failed, so the loop can answer it.
        self.peer = peer


class MalformedMessage(ProtocolError):
    """Bytes that are not a message: bad msgpack, truncated header, wrong frame count/layout."""

    code = ErrorCode.MALFORMED


class MessageTooLarge(ProtocolError):
    """The frames add up to more than the configured maximum; refused before decoding."""

    code = ErrorCode.MESSAGE_TOO_LARGE


class UnknownMessageType(ProtocolError):
    code = ErrorCode.UNKNOWN_MESSAGE_TYPE


class VersionMismatch(ProtocolError):
    code = ErrorCode.VERSION_MISMATCH


class TensorMismatch(ProtocolError):
    """A tensor header (dtype, shape) that disagrees with its frame, or a dtype we refuse."""

    code = ErrorCode.TENSOR_MISMATCH


class InvalidMessage(ProtocolError):
    """Well-formed bytes carrying field values that break the message's invariants."""

    code = ErrorCode.INVALID_MESSAGE


class InvalidTree(InvalidMessage):
    """Parent indices that do not form a rooted tree in topological order."""

    code = ErrorCode.INVALID_TREE


class AuthenticationError(ProtocolError):
    """Missing or wrong shared-secret signature."""

    code = ErrorCode.AUTHENTICATION


class HandshakeRefused(ProtocolError):
    """Peers disagree on version, model fingerprint or roles."""

    code = ErrorCode.HANDSHAKE_REFUSED


class ReceiveTimeout(ProtocolError, TimeoutError):
    code = ErrorCode.TIMEOUT


class Backpressure(ProtocolError, TimeoutError):
    """The peer's queue stayed at its high-water mark for the whole send timeout."""

    code = ErrorCode.BACKPRESSURE


class PeerUnreachable(ProtocolError):
    """ROUTER side: no connected peer has that identity (it left, or never came)."""

    code = ErrorCode.PEER_UNREACHABLE


class ChannelClosed(ProtocolError):
    code = ErrorCode.CHANNEL_CLOSED


class RemoteError(ProtocolError):
    """The peer reported a failure with a code this side has no class for."""

    code = ErrorCode.REMOTE


_CLASS_BY_CODE: dict[ErrorCode, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        ProtocolError, MalformedMessage, MessageTooLarge, UnknownMessageType,
        VersionMismatch, TensorMismatch, InvalidMessage, InvalidTree,
        AuthenticationError, HandshakeRefused, ReceiveTimeout, Backpressure,
        PeerUnreachable, ChannelClosed, RemoteError,
    )
}


def error_class_for(code: int) -> type[ProtocolError]:
    """The class to raise locally for an `Error` message received from a peer."""
    try:
        return _CLASS_BY_CODE[ErrorCode(code)]
    except ValueError:
        return RemoteError
