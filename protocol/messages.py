"""Message dataclasses: what a drafter and a verifier say to each other.

Each message validates itself in `__post_init__`, on the sender when it is built and on the
receiver when it is decoded, so a bad value fails with a typed `ProtocolError` on both sides
and never reaches model code. Indices and token ids are normalised to tuples of Python ints:
they are small, msgpack packs them natively, and tuples compare and hash. The one bulky field,
`CandidateTree.draft_probs`, stays a numpy array or torch tensor and travels as a tensor frame
(see codec.py).

A message's wire body is its own fields in declaration order, derived once per class
(`Message.to_wire` / `from_wire`); only `Handshake` flattens its fingerprint by hand. A new
field is one line and, if it breaks old peers, a new `PROTOCOL_VERSION`.

Every message carries `version`, `session_id` and `step`. Steps only move forward within a
session; the channel drops a message whose step is older than one it already admitted.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import operator
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from protocol.errors import ErrorCode, InvalidMessage, InvalidTree, ProtocolError, error_class_for

# 2: CandidateTree carries the root's `position`
# 3: ContextUpdate and Verdict may carry the target's last hidden state (`hidden`) for draft heads
PROTOCOL_VERSION = 3
MAX_HIDDEN_SIZE = 65536

MAX_SESSION_ID_CHARS = 128
MAX_STEP = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1  # no tokenizer comes near; bounds what an embedding lookup will see
MAX_TEXT_CHARS = 4096  # error details and shutdown reasons are for humans, keep them bounded
MAX_TENSOR_NDIM = 8

# Session id used by an `Error` that answers bytes we could not even decode: we do not know
# which session they belonged to. Channels admit it without a session check.
NO_SESSION = "-"


class Role(str, enum.Enum):
    DRAFTER = "drafter"
    VERIFIER = "verifier"
    PEER = "peer"  # role-agnostic actors that take turns (ensembles); pairs only with PEER


_COMPATIBLE_ROLES = {
    (Role.DRAFTER, Role.VERIFIER),
    (Role.VERIFIER, Role.DRAFTER),
    (Role.PEER, Role.PEER),
}


# ---------------------------------------------------------------------------------------------
# field checks (raise InvalidMessage so sender and receiver fail the same, typed way)


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int:
        # numpy / torch integer scalars are fine; bools and floats are not.
        if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
            raise InvalidMessage(f"{name} must be an int, got {type(value).__name__}")
        value = value.__index__()
    if not low <= value <= high:
        raise InvalidMessage(f"{name}={value} outside [{low}, {high}]")
    return value


def _as_int_tuple(name: str, values: Any, low: int | None, high: int | None) -> tuple[int, ...]:
    """`values` as a tuple of Python ints, each in [low, high] (no range check if low is None)."""
    if type(values) is not tuple:
        if hasattr(values, "tolist"):  # numpy array / torch tensor: one C call, yields ints
            values = values.tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise InvalidMessage(f"{name} must be a sequence of ints, got {type(values).__name__}")
        values = tuple(values)
    if values:
        if not set(map(type, values)) <= {int}:
            raise InvalidMessage(f"{name} must contain only ints")
        if low is not None and (min(values) < low or max(values) > high):
            raise InvalidMessage(f"{name} has a value outside [{low}, {high}]")
    return values


def _as_text(name: str, value: Any, min_chars: int, max_chars: int) -> str:
    if type(value) is not str:
        raise InvalidMessage(f"{name} must be a str, got {type(value).__name__}")
    if not min_chars <= len(value) <= max_chars:
        raise InvalidMessage(f"{name} must have {min_chars}..{max_chars} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")  # lone surrogates cannot go on the wire
        except UnicodeEncodeError:
            raise InvalidMessage(f"{name} is not encodable as UTF-8") from None
    return value


def _is_torch_tensor(value: Any) -> bool:
    # Checked by module name so that this module never imports torch.
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")


def _check_hidden(value: Any) -> None:
    """A hidden state: a 1-D float32/float16 numpy array or torch tensor, [hidden_size]."""
    if isinstance(value, np.ndarray):
        dtype_ok = value.dtype.kind == "f" and value.dtype.itemsize in (2, 4)
    elif _is_torch_tensor(value):
        dtype_ok = str(value.dtype) in ("torch.float32", "torch.float16")
    else:
        raise InvalidMessage(f"hidden must be a numpy array or torch tensor, got {type(value).__name__}")
    if not dtype_ok:
        raise InvalidMessage(f"hidden must be float32 or float16, got {value.dtype}")
    if len(value.shape) != 1 or not 0 < value.shape[0] <= MAX_HIDDEN_SIZE:
        raise InvalidMessage(f"hidden must have shape [hidden_size <= {MAX_HIDDEN_SIZE}], got {tuple(value.shape)}")


def check_tree_parents(parents: tuple[int, ...]) -> None:
    """Node 0 is the root (parent -1); every other node's parent precedes it.

    "parents[i] < i" gives topological order and rules out cycles, so the parent array of
    any N nodes passing this check is a tree rooted at node 0.
    """
    if not parents:
        raise InvalidTree("a candidate tree needs at least its root node")
    if parents[0] != -1:
        raise InvalidTree(f"parents[0] must be -1 (node 0 is the root), got {parents[0]}")
    rest = parents[1:]
    # Fast path in C (this runs for every tree on both sides); find the culprit only on failure.
    if rest and (min(rest) < 0 or not all(map(operator.lt, rest, range(1, len(parents))))):
        node = next(i for i, parent in enumerate(parents) if i and not 0 <= parent < i)
        raise InvalidTree(f"parents[{node}]={parents[node]}; need 0 <= parent < {node}")


# ---------------------------------------------------------------------------------------------
# model fingerprint


@dataclass(frozen=True)
class ModelFingerprint:
    """What two peers must agree on to exchange token ids: vocabulary size and tokenizer."""

    vocab_size: int
    tokenizer_hash: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocab_size", _as_int("vocab_size", self.vocab_size, 1, MAX_TOKEN_ID))
        _as_text("tokenizer_hash", self.tokenizer_hash, 1, 128)


def model_fingerprint(vocab_size: int, vocab: Mapping[str | bytes, int]) -> ModelFingerprint:
    """Fingerprint from a vocab size and a tokenizer's vocabulary (`tokenizer.get_vocab()`).

    SHA-256 over the (token, id) pairs sorted by id then token, each length-prefixed so that
    no two vocabularies serialise alike. Takes a plain mapping: no transformers import here.
    """
    pairs = []
    for token, token_id in vocab.items():
        raw = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else bytes(token)
        pairs.append((int(token_id), raw))
    pairs.sort()
    digest = hashlib.sha256(b"specray-vocab-v1")
    for token_id, raw in pairs:
        digest.update(token_id.to_bytes(8, "little", signed=True))
        digest.update(len(raw).to_bytes(4, "little"))
        digest.update(raw)
    return ModelFingerprint(vocab_size=vocab_size, tokenizer_hash=digest.hexdigest())


def new_session_id() -> str:
    return uuid.uuid4().hex


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
        _as_text("session_id", self.session_id, 1, MAX_SESSION_ID_CHARS)
        # Inline fast path for plain ints: this runs for every message on both sides.
        if type(self.step) is not int or not 0 <= self.step <= MAX_STEP:
            self.step = _as_int("step", self.step, 0, MAX_STEP)
        if type(self.version) is not int or self.version != PROTOCOL_VERSION:
            self.version = _as_int("version", self.version, 0, 2**16)

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
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or _is_torch_tensor(a) or _is_torch_tensor(b):
        return _same_array(a, b)
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
        if (other.role, self.role) not in _COMPATIBLE_ROLES:
            return f"role {other.role.value} cannot pair with {self.role.value}"
        return None


def _same_array(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    mine, theirs = np.asarray(a), np.asarray(b)
    return (mine.dtype == theirs.dtype and mine.shape == theirs.shape
            and bool(np.array_equal(mine, theirs, equal_nan=True)))


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
        self.token_ids = _as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        self.position = _as_int("position", self.position, 0, MAX_STEP)
        if type(self.is_prompt) is not bool:
            raise InvalidMessage("is_prompt must be a bool")
        if self.is_prompt and self.position != 0:
            raise InvalidMessage("a prompt starts at position 0")
        if self.hidden is not None:
            _check_hidden(self.hidden)

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
        self.token_ids = _as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        try:
            self.parents = _as_int_tuple("parents", self.parents, None, None)  # range: check_tree_parents
        except InvalidMessage as exc:
            raise InvalidTree(str(exc)) from None
        if len(self.parents) != len(self.token_ids):
            raise InvalidTree(f"{len(self.parents)} parents for {len(self.token_ids)} nodes")
        check_tree_parents(self.parents)
        if self.position is not None:
            self.position = _as_int("position", self.position, 0, MAX_STEP)
        if self.draft_probs is not None:
            self._check_draft_probs()

    def _check_draft_probs(self) -> None:
        probs = self.draft_probs
        if isinstance(probs, np.ndarray):
            dtype_ok = probs.dtype.kind == "f" and probs.dtype.itemsize == 4  # any byte order
        elif _is_torch_tensor(probs):
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
        self.accepted_path = _as_int_tuple("accepted_path", self.accepted_path, 1, MAX_TOKEN_ID)
        path = self.accepted_path
        if not all(map(operator.lt, path, path[1:])):
            raise InvalidMessage(f"accepted_path {path} must strictly increase (children follow parents)")
        self.bonus_token_id = _as_int("bonus_token_id", self.bonus_token_id, 0, MAX_TOKEN_ID)
        self.committed_length = _as_int("committed_length", self.committed_length, len(path) + 1, MAX_STEP)
        if self.hidden is not None:
            _check_hidden(self.hidden)


@dataclass(kw_only=True)
class Error(Message):
    """A failure reported to the peer; `code` is an `ErrorCode` (unknown codes are kept)."""

    code: int
    detail: str = ""

    TYPE_ID: ClassVar[int] = 7

    def __post_init__(self) -> None:
        self._check_common()
        self.code = _as_int("code", self.code, 0, 2**16)
        _as_text("detail", self.detail, 0, MAX_TEXT_CHARS)

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
        _as_text("reason", self.reason, 0, MAX_TEXT_CHARS)


@dataclass(kw_only=True)
class EnsembleCall(Message):
    """Ensemble leader -> member: make your context `position` committed-or-proposed tokens
    followed by `token_ids` (the leader sends only what changed), then `kind`:
    "score": logits after each of the last `count` context tokens;
    "prefill": the same for a prompt chunk (read as one block, as a prompt is);
    "draft": draw `count` tokens from your own distribution after the context.
    Answered by one `EnsembleRows` of the same step. `batch`: calls of other sessions that
    share this step; a member serving a batched leader answers them after one forward."""

    kind: str
    token_ids: tuple[int, ...]
    position: int
    count: int
    batch: int = 1

    TYPE_ID: ClassVar[int] = 9
    KINDS: ClassVar[tuple[str, ...]] = ("score", "prefill", "draft")

    def __post_init__(self) -> None:
        self._check_common()
        if self.kind not in self.KINDS:
            raise InvalidMessage(f"kind must be one of {self.KINDS}, got {self.kind!r}")
        self.token_ids = _as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        self.position = _as_int("position", self.position, 0, MAX_STEP)
        self.count = _as_int("count", self.count, 1, 2**16)
        self.batch = _as_int("batch", self.batch, 1, 4096)
        if self.kind != "draft" and self.count > self.position + len(self.token_ids):
            raise InvalidMessage(f"cannot score {self.count} rows of a "
                                 f"{self.position + len(self.token_ids)}-token context")


@dataclass(kw_only=True, eq=False)
class EnsembleRows(Message):
    """Member -> ensemble leader: the answer to the `EnsembleCall` of the same step.
    `logits`: float32 [R, V] raw logits rows (numpy or torch; a tensor frame); `token_ids`:
    the drafted tokens (draft: R of them; score: none); `seconds`: the member's compute time."""

    token_ids: tuple[int, ...]
    logits: Any
    seconds: float = 0.0

    TYPE_ID: ClassVar[int] = 10
    TENSOR_FIELDS: ClassVar[tuple[int, ...]] = (1,)

    def __post_init__(self) -> None:
        self._check_common()
        self.token_ids = _as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        logits = self.logits
        if isinstance(logits, np.ndarray):
            dtype_ok = logits.dtype.kind == "f" and logits.dtype.itemsize == 4
        elif _is_torch_tensor(logits):
            dtype_ok = str(logits.dtype) == "torch.float32"
        else:
            raise InvalidMessage(f"logits must be a numpy array or torch tensor, got {type(logits).__name__}")
        if not dtype_ok:
            raise InvalidMessage(f"logits must be float32, got {logits.dtype}")
        shape = tuple(logits.shape)
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise InvalidMessage(f"logits shape {shape}; need [R, V] with R, V >= 1")
        if self.token_ids and len(self.token_ids) != shape[0]:
            raise InvalidMessage(f"{len(self.token_ids)} drafted tokens for {shape[0]} logits rows")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) \
                or not 0 <= self.seconds < float("inf"):
            raise InvalidMessage(f"seconds must be a finite number >= 0, got {self.seconds!r}")
        self.seconds = float(self.seconds)


@dataclass(kw_only=True)
class DraftCall(Message):
    """Batched verifier -> draft server: this session's committed tokens from `position` on
    are `token_ids` (the last is the root of the next tree), then draft a chain of at most
    `depth` tokens (`alone`: stop earlier where the draft's own per-token policy says) with
    these sampling settings, `remaining` tokens being still due. `batch` calls share this
    step: the server drafts them all in one batched forward and answers each session with a
    `CandidateTree` (its `draft_probs` the [N, V] rows the tokens were drawn from, when
    sampling). `hidden`, for a server of draft heads, is the target's final hidden state at
    the root (a tensor frame): the heads draft the tree from it."""

    token_ids: tuple[int, ...]
    position: int
    depth: int
    remaining: int
    batch: int
    alone: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    hidden: Any = None

    TYPE_ID: ClassVar[int] = 11
    TENSOR_FIELDS: ClassVar[tuple[int, ...]] = (10,)

    def __post_init__(self) -> None:
        self._check_common()
        self.token_ids = _as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        if not self.token_ids:
            raise InvalidMessage("token_ids must hold at least the root token")
        self.position = _as_int("position", self.position, 0, MAX_STEP)
        self.depth = _as_int("depth", self.depth, 1, 64)
        self.remaining = _as_int("remaining", self.remaining, 2, MAX_STEP)
        self.batch = _as_int("batch", self.batch, 1, 4096)
        if type(self.alone) is not bool:
            raise InvalidMessage("alone must be a bool")
        for name, low, high in (("temperature", 0.0, 1e4), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidMessage(f"{name} must be a number in [{low}, {high}], got {value!r}")
            setattr(self, name, float(value))
        self.top_k = _as_int("top_k", self.top_k, 0, MAX_TOKEN_ID)
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed, 0, 2**63 - 1)
        if self.hidden is not None:
            _check_hidden(self.hidden)


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE_ID: cls
    for cls in (Handshake, ContextUpdate, CandidateTree, Verdict, Error, Shutdown, EnsembleCall, EnsembleRows,
                DraftCall)
}
