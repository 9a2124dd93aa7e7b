"""Drafting with heads: from the target's hidden state at the newest committed token to
the next candidate tree. Holds the heads and the tree policy; no transport, no verify.

`static`: one tree shape, chosen once from the heads' measured per-rank accuracies and
cut to the size that maximises expected tokens per verify second on this device.
`dynamic`: per step, the best nodes under the heads' current probabilities (best-first,
`decoding.head_tree`), cut the same way with this step's scores.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from actors.heads import DraftHeads
from decoding.head_tree import TreeShape, best_first, best_size, depth_mass, dynamic_tree
from decoding.tree import TokenTree

TREES = ("static", "dynamic")
CALIBRATION_DECAY = 0.97  # about the last 30 steps
CALIBRATION_PRIOR = 2.0  # pseudo-steps at ratio 1 before any is observed


@dataclass
class HeadProposal:
    tree: TokenTree  # root = the newest committed token, then the heads' candidates
    depth_mass: list[float]  # per depth: predicted chance the verify accepts a node there
    seconds: float  # heads forward + tree build
    build_s: float  # tree build alone

    @property
    def predicted(self) -> float:
        """Expected accepted drafts."""
        return sum(self.depth_mass)


class HeadDrafter:
    def __init__(self, heads: DraftHeads, tree: str = "dynamic", max_nodes: int = 64, top_m: int = 32,
                 verify_s: Mapping[int, float] | None = None):
        if tree not in TREES:
            raise ValueError(f"tree must be one of {', '.join(TREES)}, got {tree!r}")
        if max_nodes < 1 or top_m < 1:
            raise ValueError(f"max_nodes and top_m must be positive, got {max_nodes}, {top_m}")
        self.heads, self.mode, self.max_nodes, self.top_m = heads, tree, max_nodes, top_m
        self.verify_s = dict(verify_s or {})
        self.draft_s = 0.0  # running mean of the heads' forward: part of every step's cost
        # Per depth, decayed sums of predicted and observed acceptance: how far the heads'
        # probabilities are from what the target accepts (dynamic trees are sized with it).
        self.predicted = [CALIBRATION_PRIOR] * heads.n_heads
        self.observed = [CALIBRATION_PRIOR] * heads.n_heads
        self.shape = None
        if tree == "static":
            ranks = heads.cfg.accuracy.get("rank_accuracy") or self._uniform_ranks()
            paths, scores = best_first(ranks, max_nodes)
            keep = best_size(scores, self.verify_s) if self.verify_s else len(paths)
            self.shape = TreeShape(paths[:max(1, keep)])  # best-first: the first n paths are the best n
            self.static_mass = depth_mass(paths[:keep], scores[:keep], heads.n_heads)
            self._cuts: dict[int, TreeShape] = {}

    def _uniform_ranks(self) -> list[list[float]]:
        """Heads without measured accuracies: assume rank r is right 1/(r+2) of the time."""
        return [[1.0 / (r + 2) for r in range(self.top_m)] for _ in range(self.heads.n_heads)]

    def propose(self, hidden: torch.Tensor, root: int, max_depth: int) -> HeadProposal:
        start = time.perf_counter()
        m = self.top_m if self.mode == "dynamic" else int(self.shape.rank.max()) + 1
        top_ids, top_p = self.heads.top(hidden, min(m, self.heads.hot_ids.numel()), root)
        built = time.perf_counter()
        depth = min(max_depth, self.heads.n_heads)
        if self.mode == "dynamic":
            tree, mass = dynamic_tree(root, top_ids, top_p, self.max_nodes, depth, self.verify_s, self.draft_s,
                                      self.calibration)
        else:
            shape = self.shape if self.shape.depth <= depth else self._cut(depth)
            tree, mass = shape.tree(root, top_ids), self.static_mass[:depth]
        tree.attention_mask()  # built (and cached on the tree) here, so build_s counts it
        end = time.perf_counter()
        self.draft_s = 0.9 * self.draft_s + 0.1 * (built - start) if self.draft_s else built - start
        return HeadProposal(tree, mass, end - start, end - built)

    @property
    def calibration(self) -> list[float]:
        return [o / p for o, p in zip(self.observed, self.predicted)]

    def observe(self, proposal: HeadProposal, accepted: int) -> None:
        """After a verify: the target accepted `accepted` drafts of this proposal."""
        for d, mass in enumerate(proposal.depth_mass):
            self.predicted[d] = CALIBRATION_DECAY * self.predicted[d] + mass
            self.observed[d] = CALIBRATION_DECAY * self.observed[d] + float(accepted > d)

    def _cut(self, depth: int) -> TreeShape:
        """The static shape without its nodes below `depth` (a request's last tokens)."""
        if depth not in self._cuts:
            self._cuts[depth] = TreeShape([p for p in self.shape.paths if len(p) <= depth])
        return self._cuts[depth]
