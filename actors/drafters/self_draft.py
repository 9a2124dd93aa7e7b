"""The target drafting for itself (`--draft self`): each sequence's chain is drafted with
TidalDecode sparse attention over the target's own cache, then its entries are dropped
and the verify recomputes them with full attention, so the output is the target's.

No second model and no second cache: drafting reads the cache the sequence already has.
Every drafting sequence steps in one batched forward per depth, each attending sparsely
over its own cache (a short cache, within the budget, is read whole: exact).
"""

from __future__ import annotations

import torch

from actors.attention_plan import BatchItem
from actors.drafters.chains import draft_chains, expected_tokens
from actors.model import Transformer
from actors.tidal import TidalConfig
from actors.verifier import long_tensor
from decoding.acceptance import Verdict
from decoding.draft_length import CostModel, DraftLengthPolicy
from decoding.round import Draft
from decoding.sequence import Sequence


class SelfDrafter:
    def __init__(self, model: Transformer, attention: TidalConfig, max_draft: int, verify_s: dict[int, float]):
        model.check_sparse(attention)
        self.model, self.attention = model, attention
        self.tree_room = max_draft + 1
        self.policy = DraftLengthPolicy(max_len=max_draft)  # for a sequence alone
        self.policy.costs.verify_s.update(verify_s)
        # one sparse step of B sequences: at most a dense one of B single tokens (the prior), learned as it runs
        self.step = CostModel(verify_s=dict(verify_s))

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        seq.draft = True  # nothing to keep: the target's cache is the draft's

    def release(self, seq: Sequence) -> None:
        seq.draft = None

    def _step(self, seqs: list[Sequence], feed: list[int]) -> torch.Tensor:
        hidden = self.model.forward_batch([BatchItem(long_tensor([t]), s.cache, sparse=self.attention)
                                           for s, t in zip(seqs, feed)])
        return self.model.logits(torch.cat(hidden))

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int | None) -> dict[str, Draft]:
        committed = {s.id: s.cache.length for s in seqs}
        try:
            return draft_chains(seqs, k, self.policy, self._step, self.step)
        finally:  # the verify writes these positions again, densely
            for s in seqs:
                s.cache.crop(committed[s.id])

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        if draft is not None and draft.predicted > 0:
            self.policy.observe_acceptance(len(verdict.accepted), draft.predicted)

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        ks = [min(k, s.remaining - 1) for s in seqs]
        return (sum(expected_tokens(s.acceptance, kk) for s, kk in zip(seqs, ks)), k * self.step.verify(len(seqs)),
                sum(kk + 1 for kk in ks))

    def depths(self, max_draft: int) -> list[int]:
        return list(range(1, max_draft + 1))
