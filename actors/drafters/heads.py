"""Medusa / Amphista heads as a batched drafter: each sequence's tree comes from the
target's hidden state at its newest committed token, which the previous verify (or the
prefill) produced, so drafting costs one small heads forward per sequence and no extra
target pass. The tree policy (static shape or dynamic best-first) is `HeadDrafter`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from actors.head_drafter import HeadDrafter, HeadProposal
from decoding.acceptance import Verdict
from decoding.round import Draft
from decoding.sequence import Sequence

EMA = 0.8


@dataclass
class HeadsState:
    hidden: torch.Tensor  # the target's state at the newest committed token [d]
    proposal: HeadProposal | None = None  # this round's, for calibration after the verdict
    accepted: float = 1.0  # decayed mean drafts accepted per round
    size: float = 8.0  # decayed mean tree nodes verified per round


class HeadsDrafter:
    def __init__(self, drafter: HeadDrafter):
        self.drafter = drafter
        self.tree_room = drafter.max_nodes
        self.propose_s = 0.0  # decayed mean seconds per sequence: heads forward + tree build

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        seq.draft = HeadsState(hidden)

    def release(self, seq: Sequence) -> None:
        seq.draft = None

    def propose(self, seqs: list[Sequence], k: int | None) -> dict[str, Draft]:
        out = {}
        for s in seqs:  # k None: as deep as the heads reach; the tree policy sizes the tree
            depth = s.remaining - 1 if k is None else min(k, s.remaining - 1)
            if depth < 1:
                continue
            start = time.perf_counter()
            p = self.drafter.propose(s.draft.hidden, s.tokens[-1], max_depth=depth)
            took = time.perf_counter() - start
            self.propose_s = EMA * self.propose_s + (1 - EMA) * took if self.propose_s else took
            s.draft.proposal = p
            s.stats.draft_s += p.seconds
            s.stats.tree_build_s += p.build_s
            out[s.id] = Draft(p.tree, None, p.predicted)
        return out

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        st = seq.draft
        st.hidden = hidden
        if draft is not None and st.proposal is not None:
            self.drafter.observe(st.proposal, len(verdict.accepted))
            st.accepted = EMA * st.accepted + (1 - EMA) * len(verdict.accepted)
            st.size = EMA * st.size + (1 - EMA) * draft.tree.size
            st.proposal = None

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        tokens = sum(1 + s.draft.accepted for s in seqs)
        rows = sum(max(2, round(s.draft.size)) for s in seqs)
        return tokens, self.propose_s * len(seqs), rows

    def depths(self, max_draft: int) -> list[int]:
        return [min(max_draft, self.drafter.heads.n_heads)]
