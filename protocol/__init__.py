"""specray wire protocol: typed messages, msgpack + out-of-band tensor frames, ZeroMQ channels.

Imports neither Ray nor torch (torch only when a channel decodes into torch tensors) nor any
model code. See docs/protocol.md.
"""

from protocol.auth import CurveClient, CurveKeypair, CurveServer, SharedSecret, describe_link, link_auth
from protocol.batch_messages import DraftCall, EnsembleCall, EnsembleRows
from protocol.channel import DealerChannel, RouterChannel
from protocol.channel_core import ChannelConfig, ChannelStats
from protocol.codec import INLINE_TENSOR_LIMIT, MESSAGE_TYPES, decode, encode, is_zero_copy, owning_frame
from protocol.endpoints import bind_endpoint, ipc_endpoint, tcp_endpoint
from protocol.errors import (
    AuthenticationError,
    Backpressure,
    ChannelClosed,
    ErrorCode,
    HandshakeRefused,
    InvalidMessage,
    InvalidTree,
    MalformedMessage,
    MessageTooLarge,
    PeerUnreachable,
    ProtocolError,
    ReceiveTimeout,
    RemoteError,
    TensorMismatch,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.fields import NO_SESSION, PROTOCOL_VERSION
from protocol.identity import ModelFingerprint, Role, model_fingerprint, new_session_id
from protocol.messages import Error, Handshake, Message, Shutdown
from protocol.pipeline_messages import CandidateTree, ContextUpdate, Verdict
from protocol.sessions import DropReason, SessionTable

__all__ = [
    "AuthenticationError",
    "Backpressure",
    "CandidateTree",
    "ChannelClosed",
    "ChannelConfig",
    "ChannelStats",
    "ContextUpdate",
    "DraftCall",
    "CurveClient",
    "CurveKeypair",
    "CurveServer",
    "DealerChannel",
    "DropReason",
    "EnsembleCall",
    "EnsembleRows",
    "Error",
    "ErrorCode",
    "Handshake",
    "HandshakeRefused",
    "INLINE_TENSOR_LIMIT",
    "InvalidMessage",
    "InvalidTree",
    "MESSAGE_TYPES",
    "MalformedMessage",
    "Message",
    "MessageTooLarge",
    "ModelFingerprint",
    "NO_SESSION",
    "PROTOCOL_VERSION",
    "PeerUnreachable",
    "ProtocolError",
    "ReceiveTimeout",
    "RemoteError",
    "Role",
    "RouterChannel",
    "SessionTable",
    "SharedSecret",
    "describe_link",
    "link_auth",
    "Shutdown",
    "TensorMismatch",
    "UnknownMessageType",
    "Verdict",
    "VersionMismatch",
    "bind_endpoint",
    "decode",
    "encode",
    "ipc_endpoint",
    "is_zero_copy",
    "model_fingerprint",
    "new_session_id",
    "owning_frame",
    "tcp_endpoint",
]
