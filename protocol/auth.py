"""Optional authentication for `tcp://` channels. Off by default.

Two ways, pick one per channel (docs/protocol.md says when):

* `SharedSecret`: HMAC-SHA256 over every frame of a message, sent as one extra last frame.
  Authenticates, does not encrypt. Works with any libzmq. Checked before the header is
  unpacked, so unauthenticated bytes never reach msgpack.
* CURVE (`CurveServer` / `CurveClient`): libzmq's CurveZMQ, authenticated encryption per
  connection. Needs libzmq built with libsodium (`zmq.has("curve")`). The server may restrict
  clients to an allow-list of public keys, checked by a ZAP handler.

Same-node `ipc://` channels rely on file permissions instead (endpoints.py makes the socket
directory private to the user).

Links between actors (`link_auth`) derive both from one per-pipeline secret: CURVE where
libzmq has it, so a peer without the secret is refused at the handshake, before any of its
bytes are buffered; HMAC signatures where it has not.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from protocol.errors import AuthenticationError

SECRET_ENV_VAR = "SPECRAY_PROTOCOL_SECRET"
SIGNATURE_BYTES = hashlib.sha256().digest_size


@dataclass(frozen=True)
class SharedSecret:
    """HMAC key shared by every process of a cluster (e.g. through the runtime env)."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) < 16:
            raise ValueError("a shared secret needs at least 16 bytes")

    def __repr__(self) -> str:  # never print the key
        return "SharedSecret(<redacted>)"

    @classmethod
    def generate(cls) -> "SharedSecret":
        return cls(os.urandom(32))

    @classmethod
    def from_env(cls, var: str = SECRET_ENV_VAR) -> "SharedSecret | None":
        """The secret from a hex environment variable, or None if it is not set."""
        value = os.environ.get(var)
        return cls(bytes.fromhex(value)) if value else None

    def sign(self, frames: Sequence) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for frame in frames:
            view = memoryview(frame)
            # Length prefixes: moving bytes across a frame boundary changes the signature.
            mac.update(view.nbytes.to_bytes(8, "little"))
            mac.update(view)
        return mac.digest()

    def verify(self, frames: Sequence, signature) -> None:
        signature = bytes(signature)
        if len(signature) != SIGNATURE_BYTES or not hmac.compare_digest(self.sign(frames), signature):
            raise AuthenticationError("bad or missing message signature")


@dataclass(frozen=True)
class CurveKeypair:
    """Z85-encoded CURVE keypair (40 ASCII bytes each)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:
        return f"CurveKeypair(public={self.public!r}, secret=<redacted>)"

    @classmethod
    def generate(cls) -> "CurveKeypair":
        require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def derive(cls, key: bytes, label: bytes) -> "CurveKeypair":
        """The keypair that `key` and `label` determine: two processes holding one shared secret
        agree on both sides' keys without sending any."""
        require_curve()
        secret = z85.encode(hmac.new(key, b"specray-curve-" + label, hashlib.sha256).digest())
        return cls(zmq.curve_public(secret), secret)


@dataclass(frozen=True)
class CurveServer:
    """The binding side. `allowed_clients=None` admits any client that knows our public key
    (encryption without client authentication); pass the clients' public keys to restrict."""

    keypair: CurveKeypair
    allowed_clients: frozenset[bytes] | None = None

    def __init__(self, keypair: CurveKeypair, allowed_clients: Iterable[bytes] | None = None) -> None:
        object.__setattr__(self, "keypair", keypair)
        object.__setattr__(self, "allowed_clients", None if allowed_clients is None else frozenset(allowed_clients))


@dataclass(frozen=True)
class CurveClient:
    """The connecting side: its own keypair and the server's public key."""

    keypair: CurveKeypair
    server_public: bytes


Auth = SharedSecret | CurveServer | CurveClient


def link_auth(endpoint: str, secret_hex: str | None, *, binds: bool) -> Auth | None:
    """How a link between two actors authenticates, from the pipeline's shared secret (hex).
    ipc (same node, a private directory) and no secret: None. tcp: CURVE with both keypairs
    derived from the secret, the server admitting only the client's key, so an unauthenticated
    peer never gets a message buffered; a libzmq without CURVE signs every message instead."""
    if not endpoint.startswith("tcp://") or not secret_hex:
        return None
    key = bytes.fromhex(secret_hex)
    if not zmq.has("curve"):
        return SharedSecret(key)
    server, client = CurveKeypair.derive(key, b"server"), CurveKeypair.derive(key, b"client")
    return CurveServer(server, allowed_clients=[client.public]) if binds else CurveClient(client, server.public)


def describe_link(endpoint: str, auth: Auth | None) -> dict:
    """Where a link goes and how it is protected, for /health and reports (never a key)."""
    how = {CurveServer: "curve", CurveClient: "curve", SharedSecret: "hmac-sha256"}.get(type(auth))
    if how is None:
        how = "private ipc directory" if endpoint.startswith("ipc://") else "none"
    return {"endpoint": endpoint, "auth": how}


def require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; use SharedSecret instead")


class _AllowList:
    """ZAP credentials provider for one channel (one ZAP domain): its clients' public keys."""

    def __init__(self, allowed: frozenset[bytes] | None) -> None:
        self.allowed = allowed

    def callback(self, domain: str, client_public_z85: bytes) -> bool:
        return self.allowed is None or client_public_z85 in self.allowed


# libzmq takes one ZAP handler per context, so channels sharing a context share one
# authenticator thread and tell their allow-lists apart by ZAP domain.
_authenticators: dict[int, object] = {}
_authenticators_lock = threading.Lock()
_domain_counter = 0


def apply_curve_server(socket: zmq.Socket, auth: CurveServer) -> None:
    """Make `socket` a CURVE server before it binds; register its client allow-list."""
    global _domain_counter
    require_curve()
    socket.curve_server = True
    socket.curve_secretkey = auth.keypair.secret
    socket.curve_publickey = auth.keypair.public
    # Every CURVE server gets its own ZAP domain, also "allow any" ones: once a context has a
    # ZAP handler, libzmq asks it about every CURVE connection, and an unknown domain is denied.
    from zmq.auth.thread import ThreadAuthenticator

    with _authenticators_lock:
        key = socket.context.underlying
        if key not in _authenticators:
            # A plain (sync) handle on the same libzmq context, also when the channel is asyncio.
            authenticator = ThreadAuthenticator(zmq.Context.shadow(key))
            authenticator.start()
            _authenticators[key] = authenticator
        _domain_counter += 1
        domain = f"specray-{_domain_counter}"
        _authenticators[key].configure_curve_callback(
            domain=domain, credentials_provider=_AllowList(auth.allowed_clients))
    socket.zap_domain = domain.encode()


def apply_curve_client(socket: zmq.Socket, auth: CurveClient) -> None:
    """Make `socket` a CURVE client before it connects."""
    require_curve()
    socket.curve_serverkey = auth.server_public
    socket.curve_publickey = auth.keypair.public
    socket.curve_secretkey = auth.keypair.secret
