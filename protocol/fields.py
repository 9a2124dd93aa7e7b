"""The checks every message field goes through, and the bounds they enforce.

Each raises `InvalidMessage` (or `InvalidTree`) naming the field, so a bad value fails the
same typed way on the sender and on the receiver, and never reaches model code.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol.errors import InvalidMessage, InvalidTree

# 2: CandidateTree carries the root's `position`
# 3: ContextUpdate and Verdict may carry the target's last hidden state (`hidden`) for draft heads
# 4: EnsembleCall carries `batch` (a member scoring a batched leader's round) and kind "prefill"
# 5: CandidateTree says whether it was pre-drafted for its verdict's outcome (`pre_drafted`, ssd)
PROTOCOL_VERSION = 5
MAX_PRE_DRAFT_RANK = 1023
MAX_HIDDEN_SIZE = 65536

MAX_SESSION_ID_CHARS = 128
MAX_STEP = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1  # no tokenizer comes near; bounds what an embedding lookup will see
MAX_TEXT_CHARS = 4096  # error details and shutdown reasons are for humans, keep them bounded
MAX_TENSOR_NDIM = 8

# Session id used by an `Error` that answers bytes we could not even decode: we do not know
# which session they belonged to. Channels admit it without a session check.
NO_SESSION = "-"




def as_int(name: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int:
        # numpy / torch integer scalars are fine; bools and floats are not.
        if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
            raise InvalidMessage(f"{name} must be an int, got {type(value).__name__}")
        value = value.__index__()
    if not low <= value <= high:
        raise InvalidMessage(f"{name}={value} outside [{low}, {high}]")
    return value


def as_int_tuple(name: str, values: Any, low: int | None, high: int | None) -> tuple[int, ...]:
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


def as_text(name: str, value: Any, min_chars: int, max_chars: int) -> str:
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


def is_torch_tensor(value: Any) -> bool:
    # Checked by module name so that this module never imports torch.
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")


def check_hidden(value: Any) -> None:
    """A hidden state: a 1-D float32/float16 numpy array or torch tensor, [hidden_size]."""
    if isinstance(value, np.ndarray):
        dtype_ok = value.dtype.kind == "f" and value.dtype.itemsize in (2, 4)
    elif is_torch_tensor(value):
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


def same_array(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    mine, theirs = np.asarray(a), np.asarray(b)
    return (mine.dtype == theirs.dtype and mine.shape == theirs.shape
            and bool(np.array_equal(mine, theirs, equal_nan=True)))
