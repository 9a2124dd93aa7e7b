"""Messages of the batched engine's links: a draft server's calls (`DraftCall`, answered
by `CandidateTree`) and an ensemble member's (`EnsembleCall`, answered by `EnsembleRows`).
Many sessions share one step; `batch` says how many, so the far side answers after one
forward for them all. Checked as every message is (`messages.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from protocol.errors import InvalidMessage
from protocol.fields import MAX_STEP, MAX_TOKEN_ID, as_int, as_int_tuple, check_hidden, is_torch_tensor
from protocol.messages import Message


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
        self.token_ids = as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        self.position = as_int("position", self.position, 0, MAX_STEP)
        self.count = as_int("count", self.count, 1, 2**16)
        self.batch = as_int("batch", self.batch, 1, 4096)
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
        self.token_ids = as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        logits = self.logits
        if isinstance(logits, np.ndarray):
            dtype_ok = logits.dtype.kind == "f" and logits.dtype.itemsize == 4
        elif is_torch_tensor(logits):
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
        self.token_ids = as_int_tuple("token_ids", self.token_ids, 0, MAX_TOKEN_ID)
        if not self.token_ids:
            raise InvalidMessage("token_ids must hold at least the root token")
        self.position = as_int("position", self.position, 0, MAX_STEP)
        self.depth = as_int("depth", self.depth, 1, 64)
        self.remaining = as_int("remaining", self.remaining, 2, MAX_STEP)
        self.batch = as_int("batch", self.batch, 1, 4096)
        if type(self.alone) is not bool:
            raise InvalidMessage("alone must be a bool")
        for name, low, high in (("temperature", 0.0, 1e4), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidMessage(f"{name} must be a number in [{low}, {high}], got {value!r}")
            setattr(self, name, float(value))
        self.top_k = as_int("top_k", self.top_k, 0, MAX_TOKEN_ID)
        if self.seed is not None:
            self.seed = as_int("seed", self.seed, 0, 2**63 - 1)
        if self.hidden is not None:
            check_hidden(self.hidden)
