"""Message dataclasses: what a drafter and a verifier say to each other.

Each message validates itself in `__post_init__`, on the sender when it is built and on the
receiver when it is decoded, so a bad value fails with a typed `ProtocolError` on both sides
and never reaches model code. Indices and token ids are normalised to tuples of Python ints:
they are small, msgpack packs them natively, and tuples compare and hash. The one bulky field,
`CandidateTree.draft_probs`, stays a numpy array or torch tensor and travels as a tensor frame
(see codec.py).

Field checks and bounds live in `fields.py`; the batched engine's messages (draft calls,
ensemble calls and rows) in `batch_messages.py`. A message's wire body is its own fields in
declaration order, derived once per class (`Message.to_wire` / `from_wire`); only
`Handshake` flattens its fingerprint by hand. A new field is one line and, if it breaks
old peers, a new `PROTOCOL_VERSION` (`fields.py`).

Every message carries `version`, `session_id` and `step`. Steps only move forward within a
session; the channel drops a message whose step is older than one it already admitted.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from protocol.errors import ErrorCode, InvalidMessage, InvalidTree, ProtocolError, error_class_for
from protocol.fields import (
    MAX_SESSION_ID_CHARS,
    MAX_STEP,
    MAX_TEXT_CHARS,
    MAX_TOKEN_ID,
    NO_SESSION,
    PROTOCOL_VERSION,
    as_int,
    as_int_tuple,
    as_text,
    check_hidden,
    check_tree_parents,
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


@dataclass(kw_only=True, eq=False)
class ContextUpdate(Message):
    """Tokens the receiver must add to its context: the prompt, or newly committed tokens.

    `position` is the index of token_ids[0] in the full sequence, so after applying it the
    committed length is `position + len(token_ids)`. `hidden`, for a drafter made of heads,
    is the target's final hidden state at the last of these tokens' predecessors: the state
    whose next-token guess was token_ids[-1] (a tensor frame).
    """

    token_ids: tuple[int, ...]
    position: int
    is_prompt: bool = False
    hidden: Any = None

    TYPE_ID: ClassVar[int] = 2
    TENSOR_FIELDS: ClassVar[tuple[int, ...]] = (3,)

    def __post_init__(self) -> None:
        self._check_common()
        self.token_ids = as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        self.position = as_int("position", self.position, 0, MAX_STEP)
        if type(self.is_prompt) is not bool:
            raise InvalidMessage("is_prompt must be a bool")
        if self.is_prompt and self.position != 0:
            raise InvalidMessage("a prompt starts at position 0")
        if self.hidden is not None:
            check_hidden(self.hidden)

    @property
    def committed_length(self) -> int:
        return self.position + len(self.token_ids)


@dataclass(kw_only=True, eq=False)
class CandidateTree(Message):
    """Drafted continuations as a tree of N nodes.

    Node 0 is the root. `parents[0] == -1` and `0 <= parents[i] < i` otherwise (topological
    order). `position`, if given, is the root's index in the full sequence: the newest
    committed token (position = committed length - 1) in the synchronous pipeline, or the
    last token of the previous tree when an asynchronous drafter streams its speculation in
    pieces. `draft_probs`, if given, is a float32 numpy array or torch tensor of shape [N]
    (probability of each node's token) or [N, V] (row i: the draft distribution node i's
    children were drawn from); it travels as a tensor frame.
    """

    token_ids: tuple[int, ...]
    parents: tuple[int, ...]
    draft_probs: Any = None
    position: int | None = None

    TYPE_ID: ClassVar[int] = 3
    TENSOR_FIELDS: ClassVar[tuple[int, ...]] = (2,)

    def __post_init__(self) -> None:
        self._check_common()
        self.token_ids = as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        try:
            self.parents = as_int_tuple("parents", self.parents, None, None)  # range: check_tree_parents
        except InvalidMessage as exc:
            raise InvalidTree(str(exc)) from None
        if len(self.parents) != len(self.token_ids):
            raise InvalidTree(f"{len(self.parents)} parents for {len(self.token_ids)} nodes")
        check_tree_parents(self.parents)
        if self.position is not None:
            self.position = as_int("position", self.position, 0, MAX_STEP)
        if self.draft_probs is not None:
            self._check_draft_probs()

    def _check_draft_probs(self) -> None:
        probs = self.draft_probs
        if isinstance(probs, np.ndarray):
            dtype_ok = probs.dtype.kind == "f" and probs.dtype.itemsize == 4  # any byte order
        elif is_torch_tensor(probs):
            dtype_ok = str(probs.dtype) == "torch.float32"
        else:
            raise InvalidMessage(f"draft_probs must be a numpy array or torch tensor, got {type(probs).__name__}")
        if not dtype_ok:
            raise InvalidMessage(f"draft_probs must be float32, got {probs.dtype}")
        shape = tuple(probs.shape)
        if len(shape) not in (1, 2) or shape[0] != len(self.token_ids):
            raise InvalidMessage(f"draft_probs shape {shape}; need [N] or [N, V] with N={len(self.token_ids)}")

    @property
    def num_nodes(self) -> int:
        return len(self.token_ids)

    def path_tokens(self, path: Sequence[int]) -> tuple[int, ...]:
        """Token ids along an accepted path (root excluded), checking it is a chain from the root."""
        parent = 0
        for node in path:
            if not 0 < node < len(self.parents) or self.parents[node] != parent:
                raise InvalidTree(f"path {tuple(path)} is not a root-down chain of this tree")
            parent = node
        return tuple(self.token_ids[node] for node in path)


@dataclass(kw_only=True, eq=False)
class Verdict(Message):
    """The verifier's answer to a candidate tree of the same step.

    `accepted_path` lists accepted node indices from depth 1 down (root excluded); each is a
    child of the previous, so they strictly increase. `bonus_token_id` is the token the target
    model produced after the last accepted node, and `committed_length` the sequence length
    once accepted tokens and the bonus token are committed. `hidden`, for a drafter made of
    heads, is the target's final hidden state at the last accepted node (the root if none):
    where the next tree is drafted from (a tensor frame).
    """

    accepted_path: tuple[int, ...]
    bonus_token_id: int
    committed_length: int
    hidden: Any = None

    TYPE_ID: ClassVar[int] = 4
    TENSOR_FIELDS: ClassVar[tuple[int, ...]] = (3,)

    def __post_init__(self) -> None:
        self._check_common()
        self.accepted_path = as_int_tuple("accepted_path", self.accepted_path, 1, MAX_TOKEN_ID)
        path = self.accepted_path
        if not all(map(operator.lt, path, path[1:])):
            raise InvalidMessage(f"accepted_path {path} must strictly increase (children follow parents)")
        self.bonus_token_id = as_int("bonus_token_id", self.bonus_token_id, 0, MAX_TOKEN_ID)
        self.committed_length = as_int("committed_length", self.committed_length, len(path) + 1, MAX_STEP)
        if self.hidden is not None:
            check_hidden(self.hidden)


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
