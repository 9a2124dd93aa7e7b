"""The message base, and the messages that open, refuse and close a session.

Each message validates itself in `__post_init__`, on the sender when it is built and on the
receiver when it is decoded, so a bad value fails with a typed `ProtocolError` on both sides
and never reaches model code. Indices and token ids are normalised to tuples of Python ints:
they are small, msgpack packs them natively, and tuples compare and hash. Bulky fields
(draft probabilities, hidden states, logits) stay numpy arrays or torch tensors and travel
as tensor frames (see codec.py).

Field checks and bounds live in `fields.py`; the drafter/verifier messages (context
updates, trees, verdicts) in `pipeline_messages.py`; the batched engine's messages (draft
calls, ensemble calls and rows) in `batch_messages.py`. A message's wire body is its own
fields in declaration order, derived once per class (`Message.to_wire` / `from_wire`);
only `Handshake` flattens its fingerprint by hand. A new field is one line and, if it
breaks old peers, a new `PROTOCOL_VERSION` (`fields.py`).

Every message carries `version`, `session_id` and `step`. Steps only move forward within a
session; the channel drops a message whose step is older than one it already admitted.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from protocol.errors import ErrorCode, InvalidMessage, ProtocolError, error_class_for
from protocol.fields import (
    MAX_SESSION_ID_CHARS,
    MAX_STEP,
    MAX_TEXT_CHARS,
    NO_SESSION,
    PROTOCOL_VERSION,
    as_int,
    as_text,
    is_torch_tensor,
    same_array,
)
from protocol.identity import COMPATIBLE_ROLES, ModelFingerprint, Role

# ---------------------------------------------------------------------------------------------
# messages


@dataclass(kw_only=True)
class Message:
    """Fields every message carries. Subclasses add theirs and a wire type id."""

    session_id: str
    step: int
    version: int = PROTOCOL_VERSION

    TYPE_ID: ClassVar[int] = 0
    # Positions in the wire body that hold tensors; the codec moves them to frames.
    TENSOR_FIELDS: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        self._check_common()

    def _check_common(self) -> None:
        as_text("session_id", self.session_id, 1, MAX_SESSION_ID_CHARS)
        # Inline fast path for plain ints: this runs for every message on both sides.
        if type(self.step) is not int or not 0 <= self.step <= MAX_STEP:
            self.step = as_int("step", self.step, 0, MAX_STEP)
        if type(self.version) is not int or self.version != PROTOCOL_VERSION:
            self.version = as_int("version", self.version, 0, 2**16)

    # Wire body: the subclass's own fields in declaration order, msgpack-native values
    # (tensors at TENSOR_FIELDS positions). Checking happens in __post_init__, on both sides.
    def to_wire(self) -> tuple:
        return tuple(getattr(self, name) for name in _wire_fields(type(self)))

    @classmethod
    def from_wire(cls, session_id: str, step: int, version: int, body: tuple) -> "Message":
        names = _wire_fields(cls)
        return cls(session_id=session_id, step=step, version=version, **dict(zip(names, _body(body, cls, len(names)))))

    def __eq__(self, other: object) -> bool:
        """Field by field; tensors (numpy or torch) by dtype, shape and values."""
        if type(other) is not type(self):
            return NotImplemented
        return all(_same_value(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


@functools.cache
def _wire_fields(cls: type[Message]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in _COMMON_FIELDS)


_COMMON_FIELDS = ("session_id", "step", "version")


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or is_torch_tensor(a) or is_torch_tensor(b):
        return same_array(a, b)
    return a == b


def _body(body: tuple, cls: type[Message], n_fields: int) -> tuple:
    if type(body) is not tuple or len(body) != n_fields:
        raise InvalidMessage(f"{cls.__name__} body needs {n_fields} fields")
    return body


@dataclass(kw_only=True)
class Handshake(Message):
    """First message of a session, both ways: the verifier answers with its own handshake."""

    role: Role
    fingerprint: ModelFingerprint

    TYPE_ID: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._check_common()
        try:
            self.role = Role(self.role)
        except ValueError:
            raise InvalidMessage(f"unknown role {self.role!r}") from None
        if not isinstance(self.fingerprint, ModelFingerprint):
            raise InvalidMessage("fingerprint must be a ModelFingerprint")

    def to_wire(self) -> tuple:
        return (self.role.value, self.fingerprint.vocab_size, self.fingerprint.tokenizer_hash)

    @classmethod
    def from_wire(cls, session_id, step, version, body):
        role, vocab_size, tokenizer_hash = _body(body, cls, 3)
        fingerprint = ModelFingerprint(vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        return cls(session_id=session_id, step=step, version=version, role=role, fingerprint=fingerprint)

    def refusal_reason(self, other: "Handshake") -> str | None:
        """Why `other` may not talk to us, or None if it may."""
        if other.version != self.version:
            return f"protocol version {other.version} != {self.version}"
        if other.fingerprint != self.fingerprint:
            return f"model fingerprint {other.fingerprint} != {self.fingerprint}"
        if (other.role, self.role) not in COMPATIBLE_ROLES:
            return f"role {other.role.value} cannot pair with {self.role.value}"
        return None


@dataclass(kw_only=True)
class Error(Message):
    """A failure reported to the peer; `code` is an `ErrorCode` (unknown codes are kept)."""

    code: int
    detail: str = ""

    TYPE_ID: ClassVar[int] = 7

    def __post_init__(self) -> None:
        self._check_common()
        self.code = as_int("code", self.code, 0, 2**16)
        as_text("detail", self.detail, 0, MAX_TEXT_CHARS)

    @classmethod
    def from_exception(cls, exc: BaseException, *, session_id: str = NO_SESSION, step: int = 0) -> "Error":
        code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.REMOTE
        detail = f"{type(exc).__name__}: {exc}"[:MAX_TEXT_CHARS]
        return cls(session_id=session_id, step=step, code=int(code), detail=detail)

    def to_exception(self) -> ProtocolError:
        return error_class_for(self.code)(f"peer reported: {self.detail}")


@dataclass(kw_only=True)
class Shutdown(Message):
    """The sender is ending the session; the receiver frees its state for it."""

    reason: str = ""

    TYPE_ID: ClassVar[int] = 8

    def __post_init__(self) -> None:
        self._check_common()
        as_text("reason", self.reason, 0, MAX_TEXT_CHARS)
