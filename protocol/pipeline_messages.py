"""The per-step messages between a drafter and a verifier: the context it must hold
(`ContextUpdate`), the drafted tree (`CandidateTree`) and the verifier's answer (`Verdict`).
They carry the hot path, so each checks the invariants model code relies on (tree shape,
a path that is a chain, draft probabilities that fit the tree) before anything reads them.
Checked as every message is (`messages.py`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from protocol.errors import InvalidMessage, InvalidTree
from protocol.fields import (
    MAX_PRE_DRAFT_RANK,
    MAX_STEP,
    MAX_TOKEN_ID,
    as_int,
    as_int_tuple,
    check_hidden,
    check_tree_parents,
    is_torch_tensor,
)
from protocol.messages import Message


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
    children were drawn from); it travels as a tensor frame. `pre_drafted` (ssd): the rank,
    among the outcomes the drafter pre-drafted for, of the one this tree continues (0: its
    likeliest guess); None: drafted after the verdict. For the verifier's stats only.
    """

    token_ids: tuple[int, ...]
    parents: tuple[int, ...]
    draft_probs: Any = None
    position: int | None = None
    pre_drafted: int | None = None

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
        if self.pre_drafted is not None:
            self.pre_drafted = as_int("pre_drafted", self.pre_drafted, 0, MAX_PRE_DRAFT_RANK)
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
