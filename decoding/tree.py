"""Token trees: the candidates one target forward verifies at once.

A tree is two long tensors in topological order: `tokens[i]` and `parents[i]`, with node 0
the root. The root is the newest committed token, which is not yet in the target's KV
cache, so one forward over all N nodes (positions `start + depth`, attention restricted
to each node's ancestors by `attention_mask`) yields row i = the target's distribution
for the token after node i: the root's row verifies the depth-1 children, and so on.

A chain (plain draft-model speculation) is the special case parents = [-1, 0, 1, ...].
Trees are small (tens of nodes) and built once per step, so the structure (depths,
children, root paths) is computed once in Python lists and cached; the tensors handed
out are CPU tensors, copies that callers may modify freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["TokenTree"]


def _as_long_vector(name: str, value: Tensor | Sequence[int]) -> Tensor:
    t = torch.as_tensor(value)
    # An empty list becomes a float tensor; emptiness itself is judged by the caller.
    if t.numel() > 0 and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.long)


# eq=False: the generated __eq__ would compare tensors with `==` and fail on truthiness.
@dataclass(eq=False)
class TokenTree:
    tokens: Tensor  # long [N]; node 0 is the root (newest committed token)
    parents: Tensor  # long [N]; parents[0] == -1, 0 <= parents[i] < i for i >= 1

    _parent_list: list[int] = field(init=False, repr=False)
    _children: list[list[int]] = field(init=False, repr=False)
    _root_paths: list[list[int]] = field(init=False, repr=False)  # root .. node, inclusive
    _depth: Tensor = field(init=False, repr=False)
    _mask: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.tokens = _as_long_vector("tokens", self.tokens)
        self.parents = _as_long_vector("parents", self.parents)
        n = self.tokens.numel()
        if n == 0:
            raise ValueError("tokens must hold at least the root, got an empty tensor")
        if self.parents.numel() != n:
            raise ValueError(
                f"parents must have the same length as tokens ({n}), got {self.parents.numel()}"
            )
        if int(self.tokens.min()) < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens.tolist()}")
        parents = self.parents.tolist()
        if parents[0] != -1:
            raise ValueError(f"parents[0] must be -1 (the root), got {parents[0]}")
        for i in range(1, n):
            if not 0 <= parents[i] < i:
                raise ValueError(
                    f"parents[{i}] must be in [0, {i}) (topological order), got {parents[i]}"
                )

        # One pass in topological order: every parent is complete before its children.
        children: list[list[int]] = [[] for _ in range(n)]
        root_paths: list[list[int]] = [[0]]
        for i in range(1, n):
            children[parents[i]].append(i)
            root_paths.append(root_paths[parents[i]] + [i])
        self._parent_list = parents
        self._children = children
        self._root_paths = root_paths
        self._depth = torch.tensor([len(p) - 1 for p in root_paths], dtype=torch.long)
        self._mask = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def chain(cls, root: int, drafts: Sequence[int] | Tensor) -> TokenTree:
        """The root followed by a straight line of draft tokens."""
        drafts = _as_long_vector("drafts", drafts)
        tokens = torch.cat([torch.tensor([int(root)], dtype=torch.long), drafts])
        parents = torch.arange(-1, drafts.numel(), dtype=torch.long)
        return cls(tokens, parents)

    @classmethod
    def from_paths(cls, root: int, paths: Sequence[Sequence[int]]) -> TokenTree:
        """A trie of token paths below `root` (each path starts at depth 1).

        Shared prefixes are merged, so siblings are distinct tokens: good for greedy or
        static (Medusa-style) trees, but not for `verify_sampling`, whose siblings must be
        i.i.d. draws kept with their repeats. Nodes are numbered in insertion order.
        """
        tokens = [int(root)]
        parents = [-1]
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for path in paths:
            node = 0
            for tok in path:
                key = (node, int(tok))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                node = index[key]
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    # ---- structure ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._parent_list)

    @property
    def depth(self) -> Tensor:
        """long [N]: 0 for the root, parent's depth + 1 otherwise."""
        return self._depth.clone()

    def attention_mask(self) -> Tensor:
        """bool [N, N]: True where node i may attend node j (j is i or an ancestor of i).

        Only the tree block: the engine prepends the committed prefix, which every node
        sees. Row i is exactly the root path of i, so a node sees the same context it
        would have in plain autoregressive decoding of that path.
        """
        if self._mask is None:
            rows = [i for i, p in enumerate(self._root_paths) for _ in p]
            cols = [j for p in self._root_paths for j in p]
            mask = torch.zeros(self.size, self.size, dtype=torch.bool)
            mask[rows, cols] = True
            self._mask = mask
        return self._mask.clone()

    def positions(self, start: int) -> Tensor:
        """long [N] position ids = start + depth; `start` is the root's position."""
        return self._depth + int(start)

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self.size:
            raise IndexError(f"node must be in [0, {self.size}), got {node}")

    def children(self, node: int) -> list[int]:
        """Child node indices of `node`, in increasing index order."""
        self._check_node(node)
        return list(self._children[node])

    def path(self, node: int) -> list[int]:
        """Nodes from depth 1 down to `node`, root excluded ([] for the root)."""
        self._check_node(node)
        return self._root_paths[node][1:]

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self._parent_list))

    def leaves(self) -> list[int]:
        """Nodes without children, in index order."""
        return [i for i, c in enumerate(self._children) if not c]


def draft_fault(token_ids: Sequence[int], probs_shape: tuple[int, ...] | None, vocab: int) -> str | None:
    """Why a tree from another process must not reach the target (None: it may). An id past
    the vocabulary would index out of the embedding (on a GPU, a device assert that kills the
    process); draft probabilities must give one row of `vocab` per node."""
    if max(token_ids) >= vocab:
        return f"token id {max(token_ids)} is outside the vocabulary of {vocab}"
    if probs_shape is not None and tuple(probs_shape) != (len(token_ids), vocab):
        return f"the draft probabilities have shape {tuple(probs_shape)}, not ({len(token_ids)}, {vocab})"
    return None
