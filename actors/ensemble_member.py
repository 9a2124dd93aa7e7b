"""An ensemble member: the interface the decode loops (`actors.ensemble`) are written
against, and what one model does to answer it, wherever it runs. Kept apart from the loops
so a member serving over ZeroMQ (`actors.ensemble_peers`) runs the very same model math
without importing the loops that drive it.

A member is one model with its KV cache. It answers two commands for a context (the
committed tokens plus any proposals), each returning raw logits rows:
- score(context, n): rows after each of the last n context tokens (cache = context);
- draft(context, k): k tokens drawn one by one from its own q (its logits under the
  request's SamplingParams, with its own coins), and the k rows they were drawn from.
`submit` starts a command, `result` waits for it: remote members work while the leader
computes its own (local members compute inside `result`, which is called for them first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from actors.runner import ModelRunner
from decoding.request import make_generator
from decoding.sampling import SamplingParams, logits_to_probs, sample

COMMANDS = ("score", "draft")


class MemberLost(RuntimeError):
    """An ensemble member died or stopped answering mid-request."""

    def __init__(self, name: str, why: str):
        super().__init__(f"ensemble member {name!r} failed: {why}")
        self.member = name


@dataclass
class Rows:
    logits: torch.Tensor  # [R, V] raw logits (float32)
    tokens: list[int] = field(default_factory=list)  # drafted tokens (draft only)
    seconds: float = 0.0  # the member's own compute time


class Member(Protocol):
    name: str
    local: bool

    def begin(self, room: int, params: SamplingParams, seed: int | None) -> None: ...

    def submit(self, kind: str, context: list[int], count: int) -> None: ...

    def result(self) -> Rows: ...


# ---- one model: what a member does, wherever it runs ------------------------------------

def member_seed(seed: int | None, index: int) -> int | None:
    """Each member's drafting coins: independent of the leader's (seed) and of each other."""
    return None if seed is None else seed + 1 + index


def score_rows(runner: ModelRunner, context: Sequence[int], count: int) -> torch.Tensor:
    """Logits [count, V] after each of the last `count` tokens of `context`; afterwards the
    cache holds exactly `context`. Rows are computed only where asked (a long prompt's
    full logits would be [L, 152k])."""
    keep = len(context) - count
    if keep < 0 or count < 1:
        raise ValueError(f"cannot score {count} rows of a {len(context)}-token context")
    pending = runner.sync(context[:keep]) + list(context[keep:])
    hidden = runner.model.forward_hidden(torch.tensor(pending, dtype=torch.long), runner.cache)
    runner.tokens.extend(pending)
    return runner.model.logits(hidden[-count:])


def draft_rows(runner: ModelRunner, context: Sequence[int], k: int, params: SamplingParams,
               gen: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """k tokens drawn from the model's own q after `context`, and the k logits rows."""
    logits = score_rows(runner, context, 1)[0]
    tokens, rows = [], []
    while True:
        rows.append(logits)
        token = int(logits.argmax()) if params.greedy else int(sample(logits_to_probs(logits, params), gen))
        tokens.append(token)
        if len(tokens) == k:
            return tokens, torch.stack(rows)
        logits = runner.feed([token])


def run_command(runner: ModelRunner, kind: str, context: Sequence[int], count: int, params: SamplingParams,
                gen: torch.Generator) -> Rows:
    start = time.perf_counter()
    if kind == "score":
        rows = Rows(score_rows(runner, context, count))
    elif kind == "draft":
        tokens, logits = draft_rows(runner, context, count, params, gen)
        rows = Rows(logits, tokens)
    else:
        raise ValueError(f"unknown member command {kind!r}; expected one of {COMMANDS}")
    rows.seconds = time.perf_counter() - start
    return rows


class LocalMember:
    """A member in this process. Computes lazily in `result`, so remote members that were
    submitted to first work meanwhile."""

    local = True

    def __init__(self, runner: ModelRunner, name: str, index: int):
        self.runner, self.name, self.index = runner, name, index
        self._pending: tuple | None = None

    def begin(self, room: int, params: SamplingParams, seed: int | None) -> None:
        self.runner.reset(room)
        self.params, self.gen = params, make_generator(member_seed(seed, self.index))

    def submit(self, kind: str, context: list[int], count: int) -> None:
        self._pending = (kind, list(context), count)

    def result(self) -> Rows:
        kind, context, count = self._pending
        self._pending = None
        return run_command(self.runner, kind, context, count, self.params, self.gen)


def local_members(runners: Sequence[ModelRunner], names: Sequence[str] | None = None) -> list[LocalMember]:
    names = names or [f"member{i}" for i in range(len(runners))]
    return [LocalMember(r, name, i) for i, (r, name) in enumerate(zip(runners, names))]
