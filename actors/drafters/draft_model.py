"""A draft model in this process: chains drafted for every sequence at once, one batched
draft forward per depth.

The draft cache of a sequence is taken when the sequence first may draft and catches up
lazily (`_catch_up`): under load, when drafting does not pay, the draft never reads the
prompt at all. A sequence decoding alone (k None) drafts token by token while the
draft's calibrated confidence says the next token is worth its cost (`DraftLengthPolicy`,
as the single-request loop does); in a batch the scheduler picks one k for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from actors.attention_plan import BatchItem
from actors.drafters.chains import draft_chains, expected_tokens
from actors.model import Transformer
from actors.runner import PREFILL_CHUNK
from actors.tidal import TidalConfig
from actors.verifier import SlotPool, long_tensor
from decoding.acceptance import Verdict
from decoding.draft_length import CostModel, DraftLengthPolicy
from decoding.kv_cache import KVCache
from decoding.round import Draft
from decoding.sequence import Sequence


@dataclass
class DraftState:
    slot: int
    cache: KVCache
    tokens: list[int] = field(default_factory=list)  # what the draft cache holds, in order
    verified: int = 0  # leading entries of `tokens` known to be committed


class DraftModelDrafter:
    def __init__(self, model: Transformer, slots: int, max_len: int, max_draft: int,
                 sparse: TidalConfig | None = None):
        """`sparse`: the draft's steps attend sparsely (`--draft-attention tidal`): cheaper
        at long context; the target's verify keeps the output exact."""
        if sparse is not None:
            model.check_sparse(sparse)
        self.model, self.sparse = model, sparse
        self.pool = SlotPool(model, slots, max_len)
        self.tree_room = max_draft + 1
        self.step = CostModel()  # one draft step, by sequences (one token each)
        self.catch_up_s = 0.01  # per prompt token a lagging draft cache reads
        self.policy = DraftLengthPolicy(max_len=max_draft)  # for a sequence alone

    def measure(self, runner, verify_s: dict[int, float]) -> None:
        """Seed the costs on this machine: `runner` is the draft's ModelRunner, `verify_s`
        the target's measured verify costs by tokens."""
        costs = runner.measure_verify_costs((1, 2, 4, 8, 16, 64))
        self.catch_up_s = costs.pop(64) / 64
        self.step.verify_s.update(costs)
        self.policy.costs.verify_s.update(verify_s)
        self.policy.costs.draft_step_s = costs[1]

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        slot, cache = self.pool.take()
        seq.draft = DraftState(slot, cache)

    def release(self, seq: Sequence) -> None:
        if seq.draft is not None:
            self.pool.give_back(seq.draft.slot)
            seq.draft = None

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Feed each draft cache the committed tokens it lacks but the newest (drafting
        starts from that one): prompt-sized chunks, all sequences in one forward each."""
        while lagging := [s for s in seqs if len(s.tokens) - len(s.draft.tokens) > 1]:
            chunks = [(s, s.tokens[len(s.draft.tokens):len(s.tokens) - 1][:PREFILL_CHUNK]) for s in lagging]
            start = time.perf_counter()
            self.model.forward_batch([BatchItem(long_tensor(c), s.draft.cache, prefill=True) for s, c in chunks])
            n = sum(len(c) for _, c in chunks)
            self.catch_up_s = 0.7 * self.catch_up_s + 0.3 * (time.perf_counter() - start) / n
            for s, c in chunks:
                s.draft.tokens.extend(c)
                s.draft.verified = len(s.draft.tokens)

    def propose(self, seqs: list[Sequence], k: int | None, keep_rows: bool = False,
                stop: Callable[[], bool] | None = None) -> dict[str, Draft]:
        """`keep_rows`, `stop`: as `draft_chains` (SSD's pre-drafting)."""
        self._catch_up([s for s in seqs if min(self.policy.max_len if k is None else k, s.remaining - 1) > 0])
        return draft_chains(seqs, k, self.policy, self._step, self.step, keep_rows, stop)

    def _step(self, seqs: list[Sequence], feed: list[int]) -> torch.Tensor:
        hidden = self.model.forward_batch([BatchItem(long_tensor([t]), s.draft.cache, sparse=self.sparse)
                                           for s, t in zip(seqs, feed)])
        for s, t in zip(seqs, feed):
            s.draft.tokens.append(t)
        return self.model.logits(torch.cat(hidden))

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        """Keep the draft's entries that match what was committed (a rejected draft's go)."""
        if draft is not None and draft.predicted > 0:  # drafted alone, by the policy: calibrate it
            self.policy.observe_acceptance(len(verdict.accepted), draft.predicted)
        st, tokens = seq.draft, seq.tokens
        m = st.verified
        # the newest committed token stays out: it is the root the next draft feeds (a draft
        # server drafting ahead may have fed it as its guess of the bonus token)
        while m < min(len(st.tokens), len(tokens) - 1) and st.tokens[m] == tokens[m]:
            m += 1
        st.cache.crop(m)
        del st.tokens[m:]
        st.verified = m

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        """A draft cache that lags (its prompt unread, or rounds without drafting) must
        catch up first: that cost is charged in proportion to the share of the sequence's
        remaining tokens this round yields, since later rounds reuse what it read."""
        ks = [min(k, s.remaining - 1) for s in seqs]
        gains = [expected_tokens(s.acceptance, kk) for s, kk in zip(seqs, ks)]
        lag = sum((len(s.tokens) - len(s.draft.tokens) - 1) * min(1.0, g / s.remaining) for s, g in zip(seqs, gains))
        seconds = k * self.step.verify(len(seqs)) + lag * self.catch_up_s
        return sum(gains), seconds, sum(kk + 1 for kk in ks)

    def depths(self, max_draft: int) -> list[int]:
        return list(range(1, max_draft + 1))
