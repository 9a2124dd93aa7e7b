"""No drafter: every round is one plain target step per sequence (`ar`)."""

from __future__ import annotations

import torch

from decoding.acceptance import Verdict
from decoding.round import Draft
from decoding.sequence import Sequence


class NoDrafter:
    tree_room = 1

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        pass

    def propose(self, seqs: list[Sequence], k: int) -> dict[str, Draft]:
        return {}

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        return float(len(seqs)), 0.0, len(seqs)

    def depths(self, max_draft: int) -> list[int]:
        return []
