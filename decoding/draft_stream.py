"""The verifier's copy of an asynchronous drafter's speculation.

An async drafter drafts one chain ahead of the committed sequence and streams it in
pieces: each piece is a small tree whose root is the token just before it, with the
root's position in the sequence and an epoch that the drafter bumps whenever it throws
its speculation away. Pieces arrive while the target is busy verifying, so by the time
one is read, the committed sequence may already have moved past some of its tokens.

`DraftStream` keeps the drafted tokens that extend the committed sequence, and their
draft distributions. A piece is used only if every token in it agrees with what is known
at its position (committed tokens, then drafts already held) and it continues that
sequence without a gap; anything else belongs to a branch the drafter is abandoning and
is dropped. Because one epoch is one growing chain on the drafter's side, this keeps
exactly the drafter's current speculation, whatever order verdicts and pieces cross in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DraftStream:
    def __init__(self) -> None:
        self.epoch = 0
        self.tokens: list[int] = []  # drafts for positions len(committed), len(committed) + 1, ...
        self.q_rows: list[torch.Tensor | None] = []  # the draft distribution each was drawn from

    def __len__(self) -> int:
        return len(self.tokens)

    def absorb(
        self,
        committed: Sequence[int],
        epoch: int,
        position: int,
        token_ids: Sequence[int],
        draft_probs: torch.Tensor | None = None,
    ) -> int:
        """Add a piece (root at `position`, then drafts); return how many new drafts it gave."""
        if epoch < self.epoch:
            return 0
        if epoch > self.epoch:  # the drafter rolled back: everything held is from a dead branch
            self.epoch = epoch
            self.clear()
        n_committed = len(committed)

        def known(pos: int) -> int | None:
            if pos < n_committed:
                return committed[pos]
            if pos < n_committed + len(self.tokens):
                return self.tokens[pos - n_committed]
            return None

        fresh = []
        for i, token in enumerate(token_ids):
            pos = position + i
            have = known(pos)
            if have is not None:
                if have != token:
                    return 0  # disagrees with the sequence: an abandoned branch
            elif i == 0 or pos != n_committed + len(self.tokens) + len(fresh):
                return 0  # a gap: its root is not known yet
            else:
                fresh.append(i)
        for i in fresh:
            self.tokens.append(int(token_ids[i]))
            self.q_rows.append(None if draft_probs is None else draft_probs[i - 1])
        return len(fresh)

    def take(self, k: int) -> tuple[list[int], list[torch.Tensor | None]]:
        """The first k drafts and their distributions (still held until `advance`)."""
        return self.tokens[:k], self.q_rows[:k]

    def advance(self, accepted: int, next_token: int) -> None:
        """The target accepted the first `accepted` drafts and committed `next_token` after
        them. Later drafts survive only if the drafter's own token at that position is
        `next_token` (they were drawn conditioned on it). The drafter applies the same
        rule to its copy, so both sides agree without another message."""
        if len(self.tokens) > accepted and self.tokens[accepted] == next_token:
            del self.tokens[: accepted + 1], self.q_rows[: accepted + 1]
        else:
            self.clear()

    def clear(self) -> None:
        self.tokens.clear()
        self.q_rows.clear()
