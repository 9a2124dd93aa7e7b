"""Acceptance rules: which drafted tokens the target keeps, and the token it adds.

Greedy: keep drafts while they equal the target's argmax; the next token is the argmax
after the last kept one. Sampling: speculative sampling (Leviathan et al. 2023) for a
chain, and recursive rejection over i.i.d. siblings (SpecInfer-style multi-draft
speculative sampling) for a tree. Both leave the output distributed exactly as sampling
from `target_probs` token by token, whatever the draft proposed, as long as each drafted
token was really drawn from the `draft_probs` row that is passed in.

Random stream (so runs are reproducible and the chain and tree paths agree):
  1. `torch.rand(D, dtype=float64, generator=generator)` once, up front: one uniform per
     drafted token (D = G for a chain, N - 1 for a tree, uniform k belongs to the token of
     node k + 1), whether or not that token ends up being tested;
  2. then exactly one `sample(row, generator)` call for the next token (one more float64
     uniform, see `decoding.sampling.sample`).
A chain tree therefore gives the same Verdict from `verify_sampling` as the chain
function does from `verify_chain_sampling` with the same generator state.

`residual_distribution` and `acceptance_probability` are module globals looked up at call
time, so tests can monkeypatch them with broken versions and see the statistical tests
fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decoding.sampling import sample
from decoding.tree import TokenTree

__all__ = [
    "Verdict",
    "acceptance_probability",
    "residual_distribution",
    "verify_chain_greedy",
    "verify_chain_sampling",
    "verify_greedy",
    "verify_sampling",
    "verify_sampling_point_mass",
]


@dataclass
class Verdict:
    accepted: list[int]  # accepted node indices, root excluded, from depth 1 down
    next_token: int  # the correction (after a rejection) or bonus (after a leaf) token

    def __post_init__(self) -> None:
        if not isinstance(self.accepted, list) or not all(
            isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in self.accepted
        ):
            raise ValueError(f"accepted must be a list of node indices >= 1, got {self.accepted!r}")
        nt = self.next_token
        if not isinstance(nt, int) or isinstance(nt, bool) or nt < 0:
            raise ValueError(f"next_token must be an int >= 0, got {nt!r}")

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    @property
    def last_node(self) -> int:
        """The deepest accepted node (0, the root, when nothing was accepted): its target
        row produced next_token, and its KV entries are the last ones to keep."""
        return self.accepted[-1] if self.accepted else 0

    def accepted_tokens(self, tree: TokenTree) -> list[int]:
        return tree.tokens[self.accepted].tolist()


# ---- the two pieces of the sampling rule -------------------------------------------------


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(p - q, 0)) over the last dim: what to sample after a draft from q is
    rejected. If p - q has no positive mass (p == q, where rejection cannot happen
    anyway) the row is p itself, so the result is always a distribution."""
    diff = (p - q).clamp_(min=0.0)
    mass = diff.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, diff / mass.clamp(min=torch.finfo(diff.dtype).tiny), p)


def acceptance_probability(p_x: Tensor, q_x: Tensor) -> Tensor:
    """min(1, p(x) / q(x)) elementwise, for drafted tokens x (q(x) > 0)."""
    return (p_x / q_x).clamp(max=1.0)


# ---- checks --------------------------------------------------------------------------------


def _check_rows(name: str, t: Tensor, rows: int) -> None:
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] == 0:
        raise ValueError(f"{name} must have shape [{rows}, V], got {tuple(t.shape)}")


def _uniforms(n: int, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, dtype=torch.float64, generator=generator, device=device)


def _undrafted(where: str) -> ValueError:
    # A drafted token with q = 0 means draft_probs is not the distribution the token was
    # drawn from; carrying on would silently lose losslessness.
    return ValueError(f"draft_probs gives probability 0 to a drafted token ({where})")


# ---- greedy --------------------------------------------------------------------------------


def verify_greedy(tree: TokenTree, target_logits: Tensor) -> Verdict:
    """target_logits [N, V], row i = logits for the token after node i. From the root,
    descend into the first child whose token is the current row's argmax; the next token
    is the argmax at the last accepted node."""
    _check_rows("target_logits", target_logits, tree.size)
    best = target_logits.argmax(dim=-1).tolist()  # one pass over [N, V], no softmax
    tokens = tree.tokens.tolist()
    accepted: list[int] = []
    node = 0
    while True:
        want = best[node]
        match = next((c for c in tree._children[node] if tokens[c] == want), None)
        if match is None:
            return Verdict(accepted, want)
        accepted.append(match)
        node = match


def verify_chain_greedy(draft_tokens: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """draft_tokens long [G], target_logits [G + 1, V] -> (n_accepted, next_token)."""
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must be 1-D, got shape {tuple(draft_tokens.shape)}")
    g = draft_tokens.numel()
    _check_rows("target_logits", target_logits, g + 1)
    best = target_logits.argmax(dim=-1)
    match = best[:g] == draft_tokens.to(best.device)
    # Length of the all-True prefix.
    n = int(match.to(torch.int32).cumprod(dim=0).sum())
    return n, int(best[n])


# ---- sampling ------------------------------------------------------------------------------


def verify_chain_sampling(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling on a chain -> (n_accepted, next_token).

    draft_tokens long [G]; draft_probs [G, V], row j = q that draft token j was drawn
    from; target_probs [G + 1, V], row j = p for the token at draft position j (row G
    gives the bonus). Draft j is accepted with probability min(1, p_j(x)/q_j(x)); the
    first rejection samples next_token from residual_distribution(p_j, q_j); if all pass,
    next_token ~ p_G. Uniforms: G float64 up front (uniform j tests draft j), then one
    `sample` call.
    """
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must be 1-D, got shape {tuple(draft_tokens.shape)}")
    g = draft_tokens.numel()
    _check_rows("target_probs", target_probs, g + 1)
    _check_rows("draft_probs", draft_probs, g)
    if draft_probs.shape[1] != target_probs.shape[1]:
        raise ValueError(
            f"draft_probs and target_probs must share V, got {draft_probs.shape[1]} "
            f"and {target_probs.shape[1]}"
        )
    u = _uniforms(g, generator).to(target_probs.device)
    rows = torch.arange(g, device=target_probs.device)
    x = draft_tokens.to(device=target_probs.device, dtype=torch.long)
    p_x = target_probs[rows, x]
    q_x = draft_probs.to(target_probs.device)[rows, x]
    if bool((q_x <= 0).any()):
        raise _undrafted(f"chain positions {torch.nonzero(q_x <= 0).flatten().tolist()}")
    accept = u < acceptance_probability(p_x, q_x)
    n = int(accept.to(torch.int32).cumprod(dim=0).sum())
    if n < g:
        final = residual_distribution(target_probs[n], draft_probs[n].to(target_probs.device))
    else:
        final = target_probs[g]
    return n, int(sample(final, generator))


def verify_sampling(
    tree: TokenTree,
    target_probs: Tensor,
    draft_probs: Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Recursive rejection sampling over a token tree.

    target_probs [N, V]: row i = p for the token after node i. draft_probs [N, V]: row i
    = q_i, the distribution the children of node i were drawn from, i.i.d. with
    replacement (keep repeated siblings: deduplicating them biases the output). Rows of
    leaves are never read. At node i the residual r starts as p_i; each child c in index
    order is accepted with probability min(1, r(c)/q_i(c)) (descend into it), else
    r = residual_distribution(r, q_i) and the next sibling is tried. No child accepted:
    next_token ~ r. Reached a leaf: next_token ~ p_leaf (bonus).
    Uniforms: N - 1 float64 up front (uniform c - 1 tests node c), then one `sample` call.
    """
    n_nodes = tree.size
    _check_rows("target_probs", target_probs, n_nodes)
    _check_rows("draft_probs", draft_probs, n_nodes)
    if draft_probs.shape[1] != target_probs.shape[1]:
        raise ValueError(
            f"draft_probs and target_probs must share V, got {draft_probs.shape[1]} "
            f"and {target_probs.shape[1]}"
        )
    return _recursive_rejection(tree, target_probs, lambda node, x, r: draft_probs[node].to(r.device), generator)


def _recursive_rejection(tree: TokenTree, target_probs: Tensor, proposal, generator) -> Verdict:
    """The walk both sampling rules share: at each node, try its children in index order
    against the residual r (`proposal(node, token, r)` gives the q the child's token was
    proposed from), descend into the first accepted, else sample from what is left."""
    u = _uniforms(tree.size - 1, generator).tolist()
    tokens = tree.tokens.tolist()
    accepted: list[int] = []
    node = 0
    while True:
        kids = tree._children[node]
        if not kids:
            return Verdict(accepted, int(sample(target_probs[node], generator)))
        r = target_probs[node]
        chosen = None
        for c in kids:
            x = tokens[c]
            q = proposal(node, x, r)
            q_x = q[x]
            if not float(q_x) > 0:
                raise _undrafted(f"node {c}, token {x}")
            if u[c - 1] < float(acceptance_probability(r[x], q_x)):
                chosen = c
                break
            r = residual_distribution(r, q)
        if chosen is None:
            return Verdict(accepted, int(sample(r, generator)))
        accepted.append(chosen)
        node = chosen


def verify_sampling_point_mass(
    tree: TokenTree,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Recursive rejection over a tree of deterministically chosen, distinct candidates
    (draft heads' top-k): each candidate is a point-mass proposal q = one-hot(x).

    At node i the residual r starts as p_i; child c (token x) is accepted with
    probability min(1, r(x) / 1) = r(x), else r = residual_distribution(r, one-hot(x))
    (x zeroed, renormalised) and the next sibling is tried. No child accepted:
    next_token ~ r. Reached a leaf: next_token ~ p_leaf. Whatever the candidates, the
    committed token at each step is distributed exactly as p. Same random stream as
    `verify_sampling`: N - 1 float64 uniforms up front, then one `sample` call.
    """
    _check_rows("target_probs", target_probs, tree.size)

    def point_mass(node: int, x: int, r: Tensor) -> Tensor:
        q = torch.zeros_like(r)
        q[x] = 1.0
        return q

    return _recursive_rejection(tree, target_probs, point_mass, generator)
