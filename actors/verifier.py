"""The target as a batched verifier: prompt chunks in, trees scored in one forward,
accepted paths committed in place. Its KV caches live in fixed slots (`SlotPool`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.attention_plan import BatchItem
from actors.model import Transformer
from actors.tidal import TidalConfig
from decoding.draft_length import CostModel
from decoding.kv_cache import KVCache
from decoding.sequence import Sequence
from decoding.tree import TokenTree


def long_tensor(tokens: list[int]) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.long)


class SlotPool:
    """Fixed KV-cache slots of one model, one per running sequence, each `max_len` long.

    Every slot's cache is allocated (and its pages touched) when the engine starts, so the
    first burst of requests does not pay for gigabytes of page faults; then they are
    reused: a sequence growing, committing a path or leaving never copies or reallocates."""

    def __init__(self, model: Transformer, slots: int, max_len: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model, self.max_len = model, max_len
        self.caches = [model.new_cache(max_len) for _ in range(slots)]
        self.free = list(range(slots))[::-1]

    def take(self) -> tuple[int, KVCache]:
        slot = self.free.pop()
        self.caches[slot].reset()
        return slot, self.caches[slot]

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def available(self) -> int:
        return len(self.free)


@dataclass
class VerifyCosts:
    """What target forwards cost here, by rows: measured at start, then as rounds run."""
    plain: CostModel = field(default_factory=CostModel)  # B sequences, one token each
    # B trees (or chains): dearer than as many single tokens, since each sequence attends
    # with its own mask; seeded from `plain` and learned per row count as rounds run
    trees: CostModel = field(default_factory=CostModel)

    def seed(self, measured: dict[int, float]) -> None:
        self.plain.verify_s.update(measured)
        # prior: ~1.3x as many single tokens (16 chains of 2 on a 2-core Xeon)
        self.trees.verify_s.update({k: 1.3 * v for k, v in measured.items()})


def tree_item(tree: TokenTree, cache: KVCache, sparse: TidalConfig | None = None) -> BatchItem:
    """One sequence's tree in a batched forward: a chain reads causally, a tree with its mask."""
    if tree.is_chain():
        return BatchItem(tree.tokens, cache, sparse=sparse)
    return BatchItem(tree.tokens, cache, tree.positions(cache.length), tree.attention_mask(), sparse=sparse)


def commit_path(cache: KVCache, tree: TokenTree, accepted: list[int]) -> None:
    """Keep the root's and the accepted nodes' entries of a scored tree; drop the others."""
    start = cache.length - tree.size  # where the root went
    if tree.is_chain():  # the accepted nodes of a chain are its first ones: a crop
        cache.crop(start + 1 + len(accepted))
    else:
        cache.compact(start, [0] + accepted)


class TargetVerifier:
    def __init__(self, model: Transformer, pool: SlotPool, sparse: TidalConfig | None = None):
        """`sparse`: the target itself attends sparsely when scoring (`--attention tidal`, an
        approximation, labelled so); prompts are always prefilled with full attention."""
        if sparse is not None:
            model.check_sparse(sparse)
        self.model, self.pool, self.sparse = model, pool, sparse
        self.costs = VerifyCosts()

    def attach(self, seq: Sequence) -> None:
        seq.slot, seq.cache = self.pool.take()

    def free(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.pool.give_back(seq.slot)  # at once: the next admission can take it
            seq.slot, seq.cache = None, None

    def prefill(self, chunks: list[tuple[Sequence, list[int]]]) -> list[tuple[Sequence, torch.Tensor, torch.Tensor]]:
        """One prompt chunk of each sequence, all in one forward. Returns (seq, hidden [d],
        logits [1, V]) at the last prompt token of those whose prompt is now complete."""
        hidden = self.model.forward_batch([BatchItem(long_tensor(c), s.cache, prefill=True) for s, c in chunks])
        done = []
        for (seq, chunk), h in zip(chunks, hidden):
            seq.prefilled += len(chunk)
            if seq.prefilled == len(seq.prompt):
                done.append((seq, h[-1], self.model.logits(h[-1:])))
        return done

    def score(self, seqs: list[Sequence], trees: list[TokenTree]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start = time.perf_counter()
        hidden = self.model.forward_batch([tree_item(tree, seq.cache, self.sparse) for seq, tree in zip(seqs, trees)])
        logits = self.model.logits(torch.cat(hidden)).split([t.size for t in trees])
        rows = sum(t.size for t in trees)
        (self.costs.plain if rows == len(trees) else self.costs.trees).observe_verify(time.perf_counter() - start, rows)
        return list(zip(hidden, logits))

    def commit(self, seq: Sequence, tree: TokenTree, accepted: list[int]) -> None:
        commit_path(seq.cache, tree, accepted)
