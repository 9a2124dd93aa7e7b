"""Candidate trees from draft heads: static (fixed rank paths) and dynamic (per step).

Head k's m likeliest tokens, with probabilities, are the candidates at depth k+1. A node
is a path of ranks (r1, .., rd) and its score the product of its heads' marginals
p_1(r1) * .. * p_d(rd), an estimate of the chance the target accepts the whole path.
A child never outscores its parent (it multiplies in a probability <= 1), and a sibling
of lower rank never outscores one of higher rank, so the N best nodes can be found
best-first: pop the best frontier node, push its next sibling and its first child. That
is O(N log N) work for N nodes, never the m^depth paths the seed enumerated, and the
kept set is closed under ancestors by construction (a node enters the frontier only
after its parent was kept).

Static trees are the same search run once, offline, on the heads' measured per-rank
accuracies (what Medusa's `medusa_choices` are); per step they only gather tokens.
Dynamic trees run the search on the heads' current probabilities. Either way the tree
size comes from `best_size`: the N that maximises expected committed tokens per second
of verification, given the verify cost per tree size measured on this device.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from decoding.tree import TokenTree

RankPath = tuple[int, ...]


def best_first(probs: Sequence[Sequence[float]], n: int) -> tuple[list[RankPath], list[float]]:
    """The `n` best rank paths under product-of-marginals scores, best first.

    probs[k] = head k's candidate probabilities in rank order (non-increasing). Returns
    (paths, scores); every path's parent comes earlier in the list.
    """
    depth = len(probs)
    paths: list[RankPath] = []
    scores: list[float] = []
    if depth == 0 or n <= 0 or not len(probs[0]):
        return paths, scores
    # (-score, tie, path, parent score)
    frontier: list[tuple[float, int, RankPath, float]] = [(-probs[0][0], 0, (0,), 1.0)]
    tie = 1
    while frontier and len(paths) < n:
        neg, _, path, parent_score = heapq.heappop(frontier)
        score = -neg
        paths.append(path)
        scores.append(score)
        d, r = len(path) - 1, path[-1]
        if r + 1 < len(probs[d]):  # next sibling: same parent, next rank
            heapq.heappush(frontier, (-parent_score * probs[d][r + 1], tie, path[:-1] + (r + 1,), parent_score))
            tie += 1
        if d + 1 < depth and len(probs[d + 1]):  # first child
            heapq.heappush(frontier, (-score * probs[d + 1][0], tie, path + (0,), score))
            tie += 1
    return paths, scores


def best_size(scores: Sequence[float], verify_s: Mapping[int, float], overhead_s: float = 0.0,
              most: int | None = None) -> int:
    """How many of the (best-first) scored nodes to verify: the count that maximises
    (1 + expected accepted drafts) / (seconds to verify root + nodes + `overhead_s`).
    `verify_s` maps forward sizes (tokens) to measured seconds, interpolated linearly."""
    if not verify_s:
        return len(scores) if most is None else min(most, len(scores))
    sizes = sorted(verify_s)
    limit = len(scores) if most is None else min(most, len(scores))

    def cost(tokens: int) -> float:
        if tokens <= sizes[0]:
            return verify_s[sizes[0]]
        for a, b in zip(sizes, sizes[1:]):
            if tokens <= b:
                return verify_s[a] + (verify_s[b] - verify_s[a]) * (tokens - a) / (b - a)
        a, b = sizes[-2:] if len(sizes) > 1 else (sizes[0], sizes[0])
        slope = (verify_s[b] - verify_s[a]) / (b - a) if b > a else 0.0
        return verify_s[b] + slope * (tokens - b)  # past the measured sizes: the last slope

    best, best_rate, expected = 0, 1.0 / (cost(1) + overhead_s), 1.0
    for n in range(1, limit + 1):
        expected += scores[n - 1]
        rate = expected / (cost(n + 1) + overhead_s)
        if rate > best_rate:
            best, best_rate = n, rate
    return best


class TreeShape:
    """A tree of rank paths, fixed once: per step, tokens are gathered into it."""

    def __init__(self, paths: Sequence[RankPath]):
        index = {(): 0}
        parents, depth, rank = [-1], [0], [0]
        for path in paths:
            if path[:-1] not in index:
                raise ValueError(f"rank path {path} comes before its parent {path[:-1]}")
            index[tuple(path)] = len(parents)
            parents.append(index[path[:-1]])
            depth.append(len(path))
            rank.append(path[-1])
        self.paths = [tuple(p) for p in paths]
        self.parents = torch.tensor(parents, dtype=torch.long)
        self.head = torch.tensor(depth[1:], dtype=torch.long) - 1  # which head's candidates a node takes
        self.rank = torch.tensor(rank[1:], dtype=torch.long)

    @property
    def size(self) -> int:
        return self.parents.numel()

    @property
    def depth(self) -> int:
        return int(self.head.max()) + 1 if self.head.numel() else 0

    def prefix(self, n: int) -> TreeShape:
        """The first n nodes (best-first paths are closed under ancestors at every prefix)."""
        return TreeShape(self.paths[:n])

    def tree(self, root: int, top_ids: Tensor) -> TokenTree:
        """top_ids [K, m]: each head's candidates in rank order."""
        tokens = torch.cat((torch.tensor([int(root)]), top_ids[self.head, self.rank].cpu().long()))
        return TokenTree(tokens, self.parents)


def static_shape(rank_accuracy: Sequence[Sequence[float]], n: int) -> TreeShape:
    """Medusa-style fixed tree: the n best rank paths under the heads' measured chance that
    their rank-r candidate is the target's token (`rank_accuracy[k][r]`)."""
    paths, _ = best_first(rank_accuracy, n)
    return TreeShape(paths)


def dynamic_tree(root: int, top_ids: Tensor, top_p: Tensor, n: int, max_depth: int | None = None,
                 verify_s: Mapping[int, float] | None = None, overhead_s: float = 0.0,
                 calibration: Sequence[float] | None = None) -> tuple[TokenTree, list[float]]:
    """This step's tree from the heads' top-m (ids and probabilities [K, m]): the best n
    nodes, cut to the size that maximises tokens per verify second when `verify_s` is
    given. `calibration[d]` rescales depth-(d+1) scores for that cut (observed acceptance
    over the heads' predicted, per depth); the order stays the heads' own. Returns the
    tree and its expected acceptance mass per depth (uncalibrated)."""
    probs = top_p[: top_p.shape[0] if max_depth is None else max_depth].tolist()
    paths, scores = best_first(probs, n)
    if verify_s:
        factor = calibration or [1.0] * len(probs)
        keep = best_size([min(1.0, s * factor[len(p) - 1]) for p, s in zip(paths, scores)], verify_s, overhead_s)
        paths, scores = paths[:keep], scores[:keep]
    return TreeShape(paths).tree(root, top_ids), depth_mass(paths, scores, len(probs))


def depth_mass(paths: Sequence[RankPath], scores: Sequence[float], depth: int) -> list[float]:
    """Sum of node scores per depth: the predicted chance that the verify reaches depth d+1."""
    mass = [0.0] * depth
    for p, s in zip(paths, scores):
        mass[len(p) - 1] += s
    return mass
