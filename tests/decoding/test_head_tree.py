"""Tests for decoding.head_tree: best-first trees from draft heads, and their size."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.head_tree import TreeShape, best_first, best_size, dynamic_tree, static_shape

PROPS = settings(max_examples=80, deadline=None, database=None)


def sorted_probs(draw_lists):
    return [sorted(row, reverse=True) for row in draw_lists]


heads_probs = st.lists(st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5),
                       min_size=1, max_size=4).map(sorted_probs)


def brute_force(probs, n):
    """Every rank path of every depth, scored, best n (the m^depth enumeration)."""
    scored = []
    for d in range(1, len(probs) + 1):
        for path in itertools.product(*[range(len(p)) for p in probs[:d]]):
            scored.append((math.prod(probs[k][r] for k, r in enumerate(path)), path))
    scored.sort(key=lambda s: -s[0])
    return [s for s, _ in scored[:n]]


@PROPS
@given(heads_probs, st.integers(1, 40))
def test_best_first_finds_the_n_best_paths_closed_under_ancestors(probs, n):
    paths, scores = best_first(probs, n)
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx(brute_force(probs, n), rel=1e-9)
    seen = set()
    for p in paths:
        assert p[:-1] == () or p[:-1] in seen, f"{p} kept before its parent"
        seen.add(p)
    assert len(seen) == len(paths)


def test_best_first_cost_grows_with_nodes_not_with_m_to_the_depth():
    probs = [[1.0 / (r + 1) for r in range(32)] for _ in range(4)]  # 32^4 = 1M paths
    paths, _ = best_first(probs, 64)
    assert len(paths) == 64


def test_best_size_keeps_more_nodes_when_verifying_them_is_cheap():
    scores = [0.8, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02]
    flat = {1: 0.1, 16: 0.1}  # a GPU: a bigger tree costs nothing
    steep = {1: 0.1, 2: 0.2, 16: 1.6}  # each token costs a forward: no tree pays
    assert best_size(scores, flat) == len(scores)
    assert best_size(scores, steep) == 0
    mid = {1: 0.1, 4: 0.12, 8: 0.2, 16: 0.4}
    assert 0 < best_size(scores, mid) < len(scores)
    assert best_size(scores, {}) == len(scores)


def test_tree_shape_gathers_each_heads_ranked_tokens():
    shape = TreeShape([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
    top_ids = torch.tensor([[10, 11], [20, 21], [30, 31]])
    tree = shape.tree(5, top_ids)
    assert tree.tokens.tolist() == [5, 10, 11, 20, 21, 30]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert shape.depth == 3
    with pytest.raises(ValueError, match="before its parent"):
        TreeShape([(0, 0)])


def test_static_shape_follows_the_measured_rank_accuracies():
    acc = [[0.6, 0.1, 0.05], [0.3, 0.1, 0.05], [0.2, 0.05, 0.01]]
    shape = static_shape(acc, 4)
    assert shape.paths == [(0,), (0, 0), (1,), (0, 1)]  # .6, .18, .1, .06 (then (0, 0, 0) at .036)


def test_dynamic_tree_respects_depth_and_size():
    top_ids = torch.arange(12).reshape(3, 4)
    top_p = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.5, 0.4, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1]])
    tree, mass = dynamic_tree(1, top_ids, top_p, n=5)
    assert tree.size == 6
    assert int(tree.depth.max()) == 3
    assert mass == pytest.approx([0.9, 0.45 + 0.36, 0.315 + 0.252])  # (0,), (0,0) (0,1), (0,0,0) (0,1,0)
    shallow, _ = dynamic_tree(1, top_ids, top_p, n=5, max_depth=1)
    assert int(shallow.depth.max()) == 1 and shallow.size == 5
    root_only, none = dynamic_tree(1, top_ids, top_p, n=5, max_depth=0)
    assert root_only.size == 1 and none == []


def test_calibration_shrinks_the_tree_when_the_heads_are_overconfident():
    top_ids = torch.arange(12).reshape(3, 4)
    top_p = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.5, 0.4, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1]])
    costs = {1: 1.0, 2: 1.2, 4: 1.6, 8: 2.4}
    trusted, _ = dynamic_tree(1, top_ids, top_p, n=8, verify_s=costs)
    doubted, _ = dynamic_tree(1, top_ids, top_p, n=8, verify_s=costs, calibration=[0.3, 0.1, 0.1])
    assert 1 < doubted.size < trusted.size
