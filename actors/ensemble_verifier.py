"""An ensemble as the batched round's verifier (CoS, batched): every member scores each
sequence's tree in one batched forward of its own, over its own KV slots, and a node's
logits are the members' combined ones (`decoding.ensemble.combine_logits`). The round's
acceptance rule then judges a proposer's drafts against that combination: greedy
agreement with its argmax, or speculative sampling with r as the target, which is exactly
CoS's rule (accept with min(1, r/q), else sample the residual).
"""

from __future__ import annotations

import time

import torch

from actors.attention_plan import BatchItem
from actors.model import Transformer
from actors.verifier import SlotPool, VerifyCosts, commit_path, long_tensor, tree_item
from decoding.ensemble import CombineRule, combine_logits
from decoding.kv_cache import KVCache
from decoding.sequence import Sequence
from decoding.tree import TokenTree


class EnsembleVerifier:
    def __init__(self, models: list[Transformer], rule: CombineRule, slots: int, max_len: int):
        if len(models) != rule.n_models:
            raise ValueError(f"{rule.describe()} combines {rule.n_models} models, got {len(models)}")
        self.models, self.rule = models, rule
        self.pools = [SlotPool(m, slots, max_len) for m in models]
        self.pool = self.pools[0]  # admission: every member has as many slots
        self.costs = VerifyCosts()
        self.slots: dict[str, list[tuple[int, KVCache]]] = {}  # per sequence: each member's slot and cache

    def attach(self, seq: Sequence) -> None:
        self.slots[seq.id] = [pool.take() for pool in self.pools]
        seq.slot, seq.cache = self.slots[seq.id][0]  # the first member's: where the tree's root went

    def free(self, seq: Sequence) -> None:
        for pool, (slot, _) in zip(self.pools, self.slots.pop(seq.id, [])):
            pool.give_back(slot)
        seq.slot, seq.cache = None, None

    def _caches(self, seq: Sequence) -> list[KVCache]:
        return [cache for _, cache in self.slots[seq.id]]

    def prefill(self, chunks: list[tuple[Sequence, list[int]]]) -> list[tuple[Sequence, torch.Tensor, torch.Tensor]]:
        """One prompt chunk of each sequence into every member. Returns (seq, the first
        member's hidden [d], combined logits [1, V]) for prompts now complete."""
        per_member = [m.forward_batch([BatchItem(long_tensor(c), self._caches(s)[i], prefill=True) for s, c in chunks])
                      for i, m in enumerate(self.models)]
        done = []
        for j, (seq, chunk) in enumerate(chunks):
            seq.prefilled += len(chunk)
            if seq.prefilled == len(seq.prompt):
                rows = [m.logits(h[j][-1:]) for m, h in zip(self.models, per_member)]
                done.append((seq, per_member[0][j][-1], combine_logits(rows, self.rule)))
        return done

    def score(self, seqs: list[Sequence], trees: list[TokenTree]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start = time.perf_counter()
        sizes = [t.size for t in trees]
        hidden0, member_logits = None, []
        for i, model in enumerate(self.models):
            hidden = model.forward_batch([tree_item(t, self._caches(s)[i]) for s, t in zip(seqs, trees)])
            member_logits.append(model.logits(torch.cat(hidden)).split(sizes))
            hidden0 = hidden0 if hidden0 is not None else hidden
        combined = [combine_logits([lg[j] for lg in member_logits], self.rule) for j in range(len(seqs))]
        rows = sum(sizes)
        (self.costs.plain if rows == len(trees) else self.costs.trees).observe_verify(time.perf_counter() - start, rows)
        return list(zip(hidden0, combined))

    def commit(self, seq: Sequence, tree: TokenTree, accepted: list[int]) -> None:
        for cache in self._caches(seq):
            commit_path(cache, tree, accepted)
