"""An ensemble as the batched round's verifier (CoS, batched): every member scores each
sequence's tree in one batched forward of its own, over its own KV slots, and a node's
logits are the members' combined ones (`decoding.ensemble.combine_logits`). The round's
acceptance rule then judges a proposer's drafts against that combination: greedy
agreement with its argmax, or speculative sampling with r as the target, which is exactly
CoS's rule (accept with min(1, r/q), else sample the residual).

Members live in this process (a `Transformer`, over slots of its own here) or in another
(a `RemoteMember`: its actor scores the same batch on its own device while the members
here compute; `actors/member_server.py`). At least one is here: its hidden states are
what the round hands the drafter.
"""

from __future__ import annotations

import time

import torch

from actors.attention_plan import BatchItem
from actors.model import Transformer
from actors.remote_member import RemoteMember
from actors.verifier import SlotPool, VerifyCosts, commit_path, long_tensor, tree_item
from decoding.ensemble import CombineRule, combine_logits
from decoding.kv_cache import KVCache
from decoding.sequence import Sequence
from decoding.tree import TokenTree


class EnsembleVerifier:
    def __init__(self, members: list[Transformer | RemoteMember], rule: CombineRule, slots: int, max_len: int,
                 on_close=None):
        """`on_close`: what stops the members elsewhere (their actors), once their links are closed."""
        if len(members) != rule.n_models:
            raise ValueError(f"{rule.describe()} combines {rule.n_models} models, got {len(members)}")
        self.rule, self.on_close = rule, on_close
        self.local = {i: m for i, m in enumerate(members) if isinstance(m, Transformer)}
        self.remote = {i: m for i, m in enumerate(members) if not isinstance(m, Transformer)}
        if not self.local:
            raise ValueError("one ensemble member must decode in this process: its hidden states feed the drafter")
        self.pools = {i: SlotPool(m, slots, max_len) for i, m in self.local.items()}
        self.lead = min(self.local)
        self.pool = self.pools[self.lead]  # admission: every member has as many slots
        self.costs = VerifyCosts()
        self.slots: dict[str, dict[int, tuple[int, KVCache]]] = {}  # per sequence: each local member's slot and cache

    @property
    def lost(self) -> str | None:
        """Why a member in another process stopped answering (None: all answer)."""
        return next((f"ensemble member {m.name!r}: {m.lost}" for m in self.remote.values() if m.lost), None)

    def attach(self, seq: Sequence) -> None:
        self.slots[seq.id] = {i: pool.take() for i, pool in self.pools.items()}
        seq.slot, seq.cache = self.slots[seq.id][self.lead]  # where the tree's root went
        for member in self.remote.values():
            member.attach(seq)

    def free(self, seq: Sequence) -> None:
        for i, (slot, _) in self.slots.pop(seq.id, {}).items():
            self.pools[i].give_back(slot)
        seq.slot, seq.cache = None, None
        for member in self.remote.values():
            member.free(seq)

    def _cache(self, seq: Sequence, i: int) -> KVCache:
        return self.slots[seq.id][i][1]

    def prefill(self, chunks: list[tuple[Sequence, list[int]]]) -> list[tuple[Sequence, torch.Tensor, torch.Tensor]]:
        """One prompt chunk of each sequence into every member. Returns (seq, the lead
        member's hidden [d], combined logits [1, V]) for prompts now complete."""
        for member in self.remote.values():
            member.submit("prefill", [(s.id, s.prompt[:s.prefilled + len(c)], 1) for s, c in chunks])
        hidden = {i: m.forward_batch([BatchItem(long_tensor(c), self._cache(s, i), prefill=True) for s, c in chunks])
                  for i, m in self.local.items()}
        remote = {i: m.gather() for i, m in self.remote.items()}
        done = []
        for j, (seq, chunk) in enumerate(chunks):
            seq.prefilled += len(chunk)
            if seq.prefilled == len(seq.prompt):
                rows = {i: m.logits(hidden[i][j][-1:]) for i, m in self.local.items()}
                rows.update({i: r[j] for i, r in remote.items()})
                member_rows = [rows[i] for i in range(self.rule.n_models)]
                done.append((seq, hidden[self.lead][j][-1], combine_logits(member_rows, self.rule)))
        return done

    def score(self, seqs: list[Sequence], trees: list[TokenTree]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start = time.perf_counter()
        sizes = [t.size for t in trees]
        if self.remote:
            if not all(t.is_chain() for t in trees):
                raise ValueError("members in other processes score chains (the proposer drafts chains)")
            contexts = [(s.id, s.tokens + t.tokens[1:].tolist(), t.size) for s, t in zip(seqs, trees)]
            for member in self.remote.values():
                member.submit("score", contexts)
        hidden, rows = {}, {}
        for i, model in self.local.items():
            hidden[i] = model.forward_batch([tree_item(t, self._cache(s, i)) for s, t in zip(seqs, trees)])
            rows[i] = model.logits(torch.cat(hidden[i])).split(sizes)
        rows.update({i: m.gather() for i, m in self.remote.items()})
        combined = [combine_logits([rows[i][j] for i in range(self.rule.n_models)], self.rule)
                    for j in range(len(seqs))]
        n = sum(sizes)
        (self.costs.plain if n == len(trees) else self.costs.trees).observe_verify(time.perf_counter() - start, n)
        return list(zip(hidden[self.lead], combined))

    def commit(self, seq: Sequence, tree: TokenTree, accepted: list[int]) -> None:
        """Members elsewhere crop what was refused when the next call says what was kept."""
        for i in self.local:
            commit_path(self._cache(seq, i), tree, accepted)

    def close(self) -> None:
        for member in self.remote.values():
            member.close()
        if self.on_close is not None:
            self.on_close()
