"""Tests for decoding.tree.TokenTree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.tree import TokenTree

PROPS = settings(max_examples=80, deadline=None, database=None)

# The branching example used below:
#
#   0 (root, token 10)
#   |-- 1 (11)
#   |   |-- 3 (13)
#   |   |   `-- 5 (15)
#   |   `-- 4 (14)
#   `-- 2 (12)
#       `-- 6 (16)
BRANCH_PARENTS = [-1, 0, 0, 1, 1, 3, 2]
BRANCH_TOKENS = [10, 11, 12, 13, 14, 15, 16]


def branching() -> TokenTree:
    return TokenTree(torch.tensor(BRANCH_TOKENS), torch.tensor(BRANCH_PARENTS))


# ---- chains ---------------------------------------------------------------------------------


def test_chain_structure():
    tree = TokenTree.chain(7, [3, 1, 4])
    assert tree.tokens.tolist() == [7, 3, 1, 4]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.tokens.dtype == tree.parents.dtype == torch.long
    assert tree.size == 4 and tree.is_chain()
    assert torch.equal(tree.attention_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.depth.tolist() == [0, 1, 2, 3]
    assert tree.positions(100).tolist() == [100, 101, 102, 103]
    assert [tree.path(i) for i in range(4)] == [[], [1], [1, 2], [1, 2, 3]]
    assert [tree.children(i) for i in range(4)] == [[1], [2], [3], []]
    assert tree.leaves() == [3]


def test_chain_accepts_tensor_drafts_and_no_drafts():
    tree = TokenTree.chain(5, torch.tensor([8, 9], dtype=torch.int32))
    assert tree.tokens.tolist() == [5, 8, 9] and tree.tokens.dtype == torch.long
    root_only = TokenTree.chain(5, [])
    assert root_only.size == 1 and root_only.is_chain() and root_only.path(0) == []
    assert root_only.attention_mask().tolist() == [[True]] and root_only.leaves() == [0]


# ---- a branching tree -----------------------------------------------------------------------


def test_branching_mask():
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 1, 0, 1, 0],
            [1, 0, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(branching().attention_mask(), expected)


def test_branching_structure():
    tree = branching()
    assert tree.size == 7 and not tree.is_chain()
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3, 2]
    assert tree.positions(20).tolist() == [20, 21, 21, 22, 22, 23, 22]
    assert [tree.children(i) for i in range(7)] == [[1, 2], [3, 4], [6], [5], [], [], []]
    assert tree.path(0) == [] and tree.path(5) == [1, 3, 5] and tree.path(6) == [2, 6]
    assert tree.leaves() == [4, 5, 6]


def test_returned_structures_are_copies():
    tree = branching()
    tree.attention_mask()[0, 1] = True
    tree.depth[0] = 9
    tree.children(0).append(99)
    tree.path(5).append(99)
    assert not tree.attention_mask()[0, 1]
    assert tree.depth[0] == 0 and tree.children(0) == [1, 2] and tree.path(5) == [1, 3, 5]


def test_node_index_out_of_range():
    tree = branching()
    for bad in (-1, 7):
        with pytest.raises(IndexError):
            tree.children(bad)
        with pytest.raises(IndexError):
            tree.path(bad)


def test_from_paths_merges_shared_prefixes_in_insertion_order():
    tree = TokenTree.from_paths(10, [[11, 13, 15], [11, 14], [12, 16], [11, 13]])
    assert tree.tokens.tolist() == [10, 11, 13, 15, 14, 12, 16]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 1, 0, 5]
    chain = TokenTree.from_paths(1, [[2, 3, 4]])
    assert chain.is_chain() and chain.tokens.tolist() == TokenTree.chain(1, [2, 3, 4]).tokens.tolist()
    assert TokenTree.from_paths(1, []).size == 1


def test_lists_are_accepted():
    tree = TokenTree([10, 11, 12], [-1, 0, 0])
    assert tree.tokens.dtype == torch.long and tree.children(0) == [1, 2]


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens,parents,field",
    [
        ([1, 2, 3], [0, 0, 1], "parents[0]"),
        ([1, 2, 3], [-1, 0, 2], "parents[2]"),  # own index
        ([1, 2, 3], [-1, 2, 0], "parents[1]"),  # later node
        ([1, 2, 3], [-1, 0, -1], "parents[2]"),  # second root
        ([1, 2, 3], [-1, 0], "parents"),  # length mismatch
        ([1, 2], [-1, 0, 1], "parents"),
        ([], [], "tokens"),
        ([1, -2], [-1, 0], "tokens"),
        ([[1, 2]], [[-1, 0]], "tokens"),
        ([1.0, 2.0], [-1, 0], "tokens"),
        ([1, 2], [-1.0, 0.0], "parents"),
        ([True, False], [-1, 0], "tokens"),
    ],
)
def test_validation(tokens, parents, field):
    with pytest.raises(ValueError) as err:
        TokenTree(torch.tensor(tokens), torch.tensor(parents))
    assert field in str(err.value)


def test_validation_message_names_bad_value():
    with pytest.raises(ValueError, match=r"parents\[2\].*got 5"):
        TokenTree([1, 2, 3], [-1, 0, 5])


# ---- random trees ---------------------------------------------------------------------------


@st.composite
def random_trees(draw) -> TokenTree:
    n = draw(st.integers(1, 40))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, 151_935), min_size=n, max_size=n))
    return TokenTree(torch.tensor(tokens), torch.tensor(parents))


def ancestors(parents: list[int], i: int) -> set[int]:
    out = {i}
    while parents[i] != -1:
        i = parents[i]
        out.add(i)
    return out


@PROPS
@given(random_trees(), st.integers(0, 10_000))
def test_property_random_trees(tree, start):
    n = tree.size
    parents = tree.parents.tolist()
    mask = tree.attention_mask()
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    depth = tree.depth
    for i in range(n):
        path = tree.path(i)
        # mask[i, j] iff j is on path(i) or is the root
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(path) | {0}
        # ... which is the chain of parents up from i
        assert set(path) | {0} == ancestors(parents, i)
        assert len(path) == depth[i]
        # path runs from depth 1 down to i through parent links
        assert path == sorted(path) and (not path or (path[-1] == i and parents[path[0]] == 0))
        assert all(parents[b] == a for a, b in zip(path, path[1:]))
        assert tree.children(i) == [c for c in range(n) if parents[c] == i]
    assert torch.equal(tree.positions(start), depth + start)
    assert tree.is_chain() == (parents == list(range(-1, n - 1)))
    assert tree.leaves() == [i for i in range(n) if not tree.children(i)]
