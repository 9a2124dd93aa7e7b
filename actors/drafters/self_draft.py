"""The target drafting for itself (`--draft self`): each sequence's chain is drafted with
TidalDecode sparse attention over the target's own cache, then its entries are dropped
and the verify recomputes them with full attention, so the output is the target's.

No second model and no second cache: drafting reads the cache the sequence already has.
Sparse forwards run one sequence at a time (the batched forward attends densely).
"""

from __future__ import annotations

import time

import torch

from actors.drafters.draft_model import expected_tokens
from actors.model import Transformer
from actors.tidal import TidalConfig
from actors.verifier import long_tensor
from decoding.acceptance import Verdict
from decoding.draft_length import DraftLengthPolicy
from decoding.round import Draft
from decoding.sampling import logits_to_probs, sample
from decoding.sequence import Sequence
from decoding.tree import TokenTree


class SelfDrafter:
    def __init__(self, model: Transformer, attention: TidalConfig, max_draft: int, verify_s: dict[int, float]):
        model.check_sparse(attention)
        self.model, self.attention = model, attention
        self.tree_room = max_draft + 1
        self.policy = DraftLengthPolicy(max_len=max_draft)  # per token, alone and in a batch
        self.policy.costs.verify_s.update(verify_s)

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        seq.draft = True  # nothing to keep: the target's cache is the draft's

    def release(self, seq: Sequence) -> None:
        seq.draft = None

    def _step(self, seq: Sequence, token: int) -> torch.Tensor:
        return self.model.logits(self.model.forward_hidden(long_tensor([token]), seq.cache, sparse=self.attention))[0]

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int | None) -> dict[str, Draft]:
        out = {}
        for s in seqs:
            depth = min(self.policy.max_len if k is None else k, s.remaining - 1)
            if depth < 1:
                continue
            start, committed = time.perf_counter(), s.cache.length
            logits, params = self._step(s, s.tokens[-1]), s.cfg.sampling
            drafts, q_rows, confidence = [], [], []
            while True:
                if params.greedy:
                    token = int(logits.argmax())
                    p = torch.softmax(logits.float(), -1)[token].item()
                else:
                    q = logits_to_probs(logits, params)
                    token = int(sample(q, s.generator))
                    q_rows.append(q)
                    p = q.max().item()
                drafts.append(token)
                confidence.append(p * (confidence[-1] if confidence else 1.0))
                if len(drafts) >= depth or (k is None and not self.policy.keep_drafting(len(drafts), confidence)):
                    break
                logits = self._step(s, token)
            s.cache.crop(committed)  # the verify writes these positions again, densely
            q = torch.cat([torch.stack(q_rows), torch.zeros_like(q_rows[0])[None]]) if q_rows else None
            out[s.id] = Draft(TokenTree.chain(s.tokens[-1], drafts), q, sum(confidence) if k is None else 0.0)
            took = time.perf_counter() - start
            s.stats.draft_s += took
            self.policy.costs.observe_draft(took, len(drafts))
        return out

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        if draft is not None and draft.predicted > 0:
            self.policy.observe_acceptance(len(verdict.accepted), draft.predicted)

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        ks = [min(k, s.remaining - 1) for s in seqs]
        step = self.policy.costs.draft_step_s or self.policy.costs.verify(1)
        return (sum(expected_tokens(s.acceptance, kk) for s, kk in zip(seqs, ks)), step * sum(ks),
                sum(kk + 1 for kk in ks))

    def depths(self, max_draft: int) -> list[int]:
        return list(range(1, max_draft + 1))
