"""Chains drafted for many sequences at once, one batched forward per depth: the loop a
draft model and the target drafting for itself share (they differ only in whose cache
each step writes and how it attends).

Each sequence drafts until its depth; a sequence alone (k None) stops earlier when the
drafter's calibrated confidence says the next token is not worth its cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from decoding.draft_length import CostModel, DraftLengthPolicy
from decoding.round import Draft
from decoding.sampling import logits_to_probs, sample
from decoding.sequence import Sequence
from decoding.tree import TokenTree

# one draft step: the sequences still drafting and the token each feeds -> logits [B, V]
StepFn = Callable[[list[Sequence], list[int]], torch.Tensor]


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one round commits when drafting k with per-token acceptance `acceptance`."""
    a = min(acceptance, 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def draft_chains(seqs: list[Sequence], k: int | None, policy: DraftLengthPolicy, step: StepFn,
                 step_costs: CostModel, keep_rows: bool = False,
                 stop: Callable[[], bool] | None = None) -> dict[str, Draft]:
    """A chain from each sequence's newest token, of depth min(k, what it may still emit).
    `step_costs` learns one step's seconds by the number of sequences in it. `keep_rows`:
    each draft keeps its per-depth distributions; `stop`, asked after each step: True ends
    every chain there (shorter chains are valid drafts)."""
    alone = k is None
    depth = {s.id: min(policy.max_len if alone else k, s.remaining - 1) for s in seqs}
    seqs = [s for s in seqs if depth[s.id] > 0]
    drafts: dict[str, list[int]] = {s.id: [] for s in seqs}
    q_rows: dict[str, list[torch.Tensor]] = {s.id: [] for s in seqs}
    rows: dict[str, list[torch.Tensor]] = {s.id: [] for s in seqs}
    confidence: dict[str, list[float]] = {s.id: [] for s in seqs}  # P(first j drafts all accepted)
    feed = {s.id: s.tokens[-1] for s in seqs}
    active, began = list(seqs), time.perf_counter()
    while active:
        start = time.perf_counter()
        logits = step(active, [feed[s.id] for s in active])
        step_costs.observe_verify(time.perf_counter() - start, len(active))
        still = []
        for s, lg in zip(active, logits):
            params = s.cfg.sampling
            if params.greedy:
                token = int(lg.argmax())
                probs = torch.softmax(lg.float(), -1) if alone or keep_rows else None
                p = probs[token].item() if alone else 1.0
            else:
                q = probs = logits_to_probs(lg, params)
                token = int(sample(q, s.generator))
                q_rows[s.id].append(q)
                p = q.max().item() if alone else 1.0
            if keep_rows:
                rows[s.id].append(probs)
            drafts[s.id].append(token)
            conf = confidence[s.id]
            conf.append(p * (conf[-1] if conf else 1.0))
            n = len(drafts[s.id])
            if n < depth[s.id] and (not alone or policy.keep_drafting(n, conf)):
                feed[s.id] = token
                still.append(s)
        active = still if stop is None or not stop() else []
    out = {}
    for s in seqs:
        q = None
        if q_rows[s.id]:  # row i: what node i's child was drawn from; the leaf's row is never read
            q = torch.cat([torch.stack(q_rows[s.id]), torch.zeros_like(q_rows[s.id][0])[None]])
        out[s.id] = Draft(TokenTree.chain(s.tokens[-1], drafts[s.id]), q, sum(confidence[s.id]) if alone else 0.0,
                          torch.stack(rows[s.id]) if keep_rows else None)
        s.stats.draft_s += time.perf_counter() - began
    if alone and seqs:
        policy.costs.observe_draft(time.perf_counter() - began, len(drafts[seqs[0].id]))
    return out
