"""Tests for decoding.acceptance: greedy and sampling verification, chain and tree.

The heart is the statistical test: speculative sampling on a toy trigram target/draft pair
must generate sequences distributed exactly as the target would alone (chi-squared test
against the exact distribution), and must stop doing so when the residual or the accept
rule is broken, which shows the test has the power to notice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import decoding.acceptance as acceptance
from decoding.acceptance import (
    Verdict,
    acceptance_probability,
    residual_distribution,
    verify_chain_greedy,
    verify_chain_sampling,
    verify_greedy,
    verify_sampling,
)
from decoding.sampling import SamplingParams, logits_to_probs, sample
from decoding.tree import TokenTree

PROPS = settings(max_examples=60, deadline=None, database=None)


def one_hot_rows(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- Verdict --------------------------------------------------------------------------------


def test_verdict_helpers():
    tree = TokenTree([10, 11, 12, 13], [-1, 0, 0, 2])
    v = Verdict(accepted=[2, 3], next_token=7)
    assert v.accepted_tokens(tree) == [12, 13] and v.num_accepted == 2 and v.last_node == 3
    empty = Verdict(accepted=[], next_token=0)
    assert empty.accepted_tokens(tree) == [] and empty.last_node == 0


@pytest.mark.parametrize(
    "accepted,next_token,field",
    [([0], 1, "accepted"), ((1,), 1, "accepted"), ([1.0], 1, "accepted"), ([1], -1, "next_token"),
     ([1], 2.0, "next_token")],
)
def test_verdict_validation(accepted, next_token, field):
    with pytest.raises(ValueError, match=field):
        Verdict(accepted=accepted, next_token=next_token)


# ---- greedy ---------------------------------------------------------------------------------


def logits_with_argmax(best: list[int], vocab: int = 8, seed: int = 0) -> torch.Tensor:
    """Random logits whose row i has its argmax at best[i]."""
    logits = torch.randn(len(best), vocab, generator=gen(seed))
    logits[torch.arange(len(best)), torch.tensor(best)] = 10.0
    return logits


def test_greedy_chain_all_accepted_gives_bonus():
    tree = TokenTree.chain(1, [2, 3, 4])
    logits = logits_with_argmax([2, 3, 4, 5])
    assert verify_greedy(tree, logits) == Verdict([1, 2, 3], 5)
    assert verify_chain_greedy(torch.tensor([2, 3, 4]), logits) == (3, 5)


def test_greedy_chain_first_mismatch_gives_correction():
    tree = TokenTree.chain(1, [2, 3, 4])
    logits = logits_with_argmax([2, 6, 4, 5])  # the draft 4 after the mismatch is ignored
    assert verify_greedy(tree, logits) == Verdict([1], 6)
    assert verify_chain_greedy(torch.tensor([2, 3, 4]), logits) == (1, 6)
    logits = logits_with_argmax([7, 3, 4, 5])
    assert verify_greedy(tree, logits) == Verdict([], 7)
    assert verify_chain_greedy(torch.tensor([2, 3, 4]), logits) == (0, 7)


def test_greedy_chain_without_drafts():
    logits = logits_with_argmax([3])
    assert verify_chain_greedy(torch.tensor([], dtype=torch.long), logits) == (0, 3)
    assert verify_greedy(TokenTree.chain(1, []), logits) == Verdict([], 3)


def test_greedy_tree_follows_matching_branch():
    #  0 (1) -- 1 (2) -- 3 (5)
    #        `- 2 (3) -- 4 (6) -- 6 (7)
    #                 `- 5 (4)
    tree = TokenTree([1, 2, 3, 5, 6, 4, 7], [-1, 0, 0, 1, 2, 2, 4])
    # Root wants 3 (second child), node 2 wants 4 (its second child), node 5 is a leaf.
    logits = logits_with_argmax([3, 0, 4, 0, 0, 6, 0])
    v = verify_greedy(tree, logits)
    assert v == Verdict([2, 5], 6) and v.accepted_tokens(tree) == [3, 4]
    # Root wants 2: first branch, then node 1 wants 0, not 5.
    assert verify_greedy(tree, logits_with_argmax([2, 0, 0, 0, 0, 0, 0])) == Verdict([1], 0)


def test_greedy_tree_duplicate_siblings_take_first():
    tree = TokenTree([1, 2, 2], [-1, 0, 0])
    assert verify_greedy(tree, logits_with_argmax([2, 5, 6])) == Verdict([1], 5)


def test_greedy_ties_break_to_first_index_like_argmax():
    logits = torch.tensor([[0.0, 3.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert verify_chain_greedy(torch.tensor([1, 0]), logits) == (2, 2)
    assert verify_greedy(TokenTree.chain(0, [2, 0]), logits) == Verdict([], 1)


def test_greedy_shape_validation():
    with pytest.raises(ValueError, match="target_logits"):
        verify_greedy(TokenTree.chain(1, [2]), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="target_logits"):
        verify_chain_greedy(torch.tensor([1, 2]), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_chain_greedy(torch.tensor([[1, 2]]), torch.zeros(3, 5))


@st.composite
def greedy_chain_cases(draw):
    vocab = draw(st.integers(2, 6))
    g = draw(st.integers(0, 6))
    logits = torch.tensor(
        draw(st.lists(st.lists(st.integers(-3, 3), min_size=vocab, max_size=vocab), min_size=g + 1, max_size=g + 1)),
        dtype=torch.float32,
    )
    best = logits.argmax(-1).tolist()
    # Mostly follow the argmax so long accepted runs are common, sometimes deviate.
    drafts = [best[j] if draw(st.integers(0, 3)) else draw(st.integers(0, vocab - 1)) for j in range(g)]
    return draw(st.integers(0, vocab - 1)), drafts, logits


@PROPS
@given(greedy_chain_cases())
def test_property_chain_greedy_equals_tree_greedy(case):
    root, drafts, logits = case
    n, nxt = verify_chain_greedy(torch.tensor(drafts, dtype=torch.long), logits)
    v = verify_greedy(TokenTree.chain(root, drafts), logits)
    assert v.accepted == list(range(1, n + 1)) and v.next_token == nxt
    # Reference: accept while the draft is the argmax.
    best = logits.argmax(-1).tolist()
    ref = 0
    while ref < len(drafts) and drafts[ref] == best[ref]:
        ref += 1
    assert (n, nxt) == (ref, best[ref])


# ---- residual and accept rule ----------------------------------------------------------------


def test_residual_distribution():
    p = torch.tensor([0.5, 0.2, 0.3, 0.0])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]))
    # Batched rows, and p == q (no positive mass) gives p back.
    out = residual_distribution(torch.stack([p, p]), torch.stack([q, p]))
    torch.testing.assert_close(out, torch.stack([torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]), p]))
    assert torch.equal(p, torch.tensor([0.5, 0.2, 0.3, 0.0]))  # inputs untouched
    # No positive mass with p != q (rounding can leave p a hair below q): p, not q.
    low = torch.tensor([0.3, 0.2, 0.5])
    assert torch.equal(residual_distribution(low, low + 1e-7), low)


def test_acceptance_probability():
    got = acceptance_probability(torch.tensor([0.2, 0.5, 0.0, 0.3]), torch.tensor([0.4, 0.25, 0.1, 0.3]))
    torch.testing.assert_close(got, torch.tensor([0.5, 1.0, 0.0, 1.0]))


# ---- sampling: exact behaviour -----------------------------------------------------------------


def random_probs(rows: int, vocab: int, seed: int, zeros: float = 0.0) -> torch.Tensor:
    g = gen(seed)
    w = torch.rand(rows, vocab, generator=g)
    if zeros:
        w = w * (torch.rand(rows, vocab, generator=g) >= zeros)
        w[:, 0] += 0.01  # keep some mass in every row
    return w / w.sum(-1, keepdim=True)


def test_chain_stream_convention():
    # G float64 uniforms up front, uniform j tests draft j, then one `sample` call.
    p = random_probs(4, 5, seed=1)
    q = random_probs(3, 5, seed=2)
    drafts = torch.tensor([1, 3, 2])
    for seed in range(20):
        n, nxt = verify_chain_sampling(drafts, q, p, gen(seed))
        g = gen(seed)
        u = torch.rand(3, dtype=torch.float64, generator=g)
        ratio = (p[torch.arange(3), drafts] / q[torch.arange(3), drafts]).clamp(max=1)
        ref_n = 0
        while ref_n < 3 and u[ref_n] < ratio[ref_n]:
            ref_n += 1
        final = residual_distribution(p[ref_n], q[ref_n]) if ref_n < 3 else p[3]
        assert (n, nxt) == (ref_n, int(sample(final, g)))


def test_p_equals_q_accepts_everything():
    p = random_probs(4, 7, seed=3)
    for seed in range(30):
        drafts = sample(p[:3], gen(100 + seed))
        n, _ = verify_chain_sampling(drafts, p[:3], p, gen(seed))
        assert n == 3
        v = verify_sampling(TokenTree.chain(0, drafts), p, p, gen(seed))
        assert v.accepted == [1, 2, 3]
    # In a tree the first sibling is always accepted.
    tree = TokenTree([0, 2, 5, 1], [-1, 0, 0, 1])
    for seed in range(30):
        assert verify_sampling(tree, p, p, gen(seed)).accepted == [1, 3]


def test_draft_with_zero_target_probability_is_always_rejected():
    p = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.8, 0.1, 0.0]])
    tree = TokenTree([3, 1, 1], [-1, 0, 0])  # two i.i.d. siblings, both token 1
    tree_q = torch.cat([q, torch.full((2, 4), math.nan)])  # leaf rows are never read
    tree_p = torch.cat([p[:1], p[1:], p[1:]])
    for seed in range(50):
        n, nxt = verify_chain_sampling(torch.tensor([1]), q, p, gen(seed))
        assert n == 0 and nxt in (0, 2)
        v = verify_sampling(tree, tree_p, tree_q, gen(seed))
        assert v.accepted == [] and v.next_token in (0, 2)


def test_greedy_draft_as_one_hot_q():
    # A greedy draft against a sampling target: q is one-hot, so the accept probability is
    # p(x) and the residual is p without x, renormalised.
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = one_hot_rows([1], 3)
    accepted, corrections = 0, set()
    for seed in range(400):
        n, nxt = verify_chain_sampling(torch.tensor([1]), q, p, gen(seed))
        accepted += n
        if n == 0:
            corrections.add(nxt)
    assert corrections == {0, 2} and 0.22 < accepted / 400 < 0.38


def test_drafted_token_with_zero_draft_probability_raises():
    p = random_probs(2, 3, seed=4)
    q = torch.tensor([[0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match="draft_probs"):
        verify_chain_sampling(torch.tensor([2]), q, p, gen(0))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_sampling(TokenTree.chain(0, [2]), p, torch.cat([q, q]), gen(0))


def test_sampling_shape_validation():
    p, q = random_probs(3, 5, seed=5), random_probs(2, 5, seed=6)
    with pytest.raises(ValueError, match="target_probs"):
        verify_chain_sampling(torch.tensor([1, 2]), q, p[:2])
    with pytest.raises(ValueError, match="draft_probs"):
        verify_chain_sampling(torch.tensor([1, 2]), q[:1], p)
    with pytest.raises(ValueError, match="share V"):
        verify_chain_sampling(torch.tensor([1, 2]), q[:, :4], p)
    tree = TokenTree.chain(0, [1, 2])
    with pytest.raises(ValueError, match="draft_probs"):
        verify_sampling(tree, p, q)
    with pytest.raises(ValueError, match="target_probs"):
        verify_sampling(tree, p[:2], q)


@st.composite
def sampling_chain_cases(draw):
    vocab = draw(st.integers(2, 6))
    g = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31))
    p = random_probs(g + 1, vocab, seed, zeros=draw(st.sampled_from([0.0, 0.5])))
    q = random_probs(g, vocab, seed + 1, zeros=draw(st.sampled_from([0.0, 0.5])))
    if draw(st.booleans()):  # drafts that are often right
        q = 0.5 * q + 0.5 * p[:g]
    drafts = sample(q, gen(seed + 2)) if g else torch.tensor([], dtype=torch.long)
    return drafts, q, p, seed + 3


@PROPS
@given(sampling_chain_cases())
def test_property_chain_sampling_equals_tree_sampling(case):
    # Same generator state -> same verdict, by the shared stream convention.
    drafts, q, p, seed = case
    n, nxt = verify_chain_sampling(drafts, q, p, gen(seed))
    tree_q = torch.cat([q, torch.full((1, p.shape[1]), math.nan)])  # leaf row never read
    v = verify_sampling(TokenTree.chain(7, drafts), p, tree_q, gen(seed))
    assert v.accepted == list(range(1, n + 1)) and v.next_token == nxt
    final = residual_distribution(p[n], q[n]) if n < len(drafts) else p[n]
    assert final[nxt] > 0


# ---- sampling: statistical losslessness --------------------------------------------------------
#
# Toy autoregressive models over V tokens: the next-token distribution depends on the last
# two tokens through a random table (a trigram model), so p and q change along every
# draft. Generating LENGTH tokens after PROMPT by speculation must reproduce the target's
# exact joint distribution over the V**LENGTH sequences.

V = 6
PROMPT = (0, 1)
LENGTH = 3
N_SEQUENCES = 10_000


@dataclass
class ToyPair:
    target: torch.Tensor  # [V, V, V] probs: target[a, b] = p(. | ..., a, b)
    draft: torch.Tensor  # [V, V, V]

    def exact(self) -> np.ndarray:
        """Exact target probability of each continuation x1 x2 x3, flattened."""
        a, b = PROMPT
        p = self.target.double()
        return (p[a, b][:, None, None] * p[b][:, :, None] * p).flatten().numpy()


def toy_pair(params: SamplingParams, seed: int = 0) -> ToyPair:
    g = gen(seed)
    target = torch.randn(V, V, V, generator=g)
    # Related but clearly different: acceptance is high enough to reach the bonus token
    # often, low enough that rejections (and so residuals) happen often.
    draft = target + torch.randn(V, V, V, generator=g)
    return ToyPair(logits_to_probs(target, params), logits_to_probs(draft, params))


def encode(tokens: list[int]) -> int:
    return int(np.ravel_multi_index(tokens[:LENGTH], (V,) * LENGTH))


def generate_chain(pair: ToyPair, seed: int, gamma: int = 2, greedy_draft: bool = False) -> np.ndarray:
    """Counts of generated sequences, speculating with chains of `gamma` drafts."""
    g = gen(seed)
    ctx = torch.tensor(PROMPT).repeat(N_SEQUENCES, 1)  # last two tokens of each sequence
    out: list[list[int]] = [[] for _ in range(N_SEQUENCES)]
    active = list(range(N_SEQUENCES))
    while active:
        # Draft for all active sequences at once; verify one by one (that is the unit
        # under test). Row j of seq is the context token before draft position j.
        seq = ctx[active]
        for _ in range(gamma):
            q = pair.draft[seq[:, -2], seq[:, -1]]
            tok = q.argmax(-1) if greedy_draft else sample(q, g)
            seq = torch.cat([seq, tok[:, None]], 1)
        target_rows = pair.target[seq[:, :-1], seq[:, 1:]]  # [m, gamma + 1, V]
        draft_rows = pair.draft[seq[:, :-2], seq[:, 1:-1]]  # [m, gamma, V]
        if greedy_draft:
            draft_rows = torch.nn.functional.one_hot(draft_rows.argmax(-1), V).float()
        drafts = seq[:, 2:]
        for k, s in enumerate(active):
            n, nxt = verify_chain_sampling(drafts[k], draft_rows[k], target_rows[k], g)
            new = drafts[k, :n].tolist() + [nxt]
            out[s] += new
            ctx[s] = torch.tensor(([int(ctx[s, 1])] + new)[-2:])
        active = [s for s in active if len(out[s]) < LENGTH]
    return np.bincount([encode(o) for o in out], minlength=V**LENGTH)


def full_tree_parents(branching: tuple[int, int]) -> list[int]:
    """Root, k1 children, k2 children under each of them (depth 2, index order by depth)."""
    k1, k2 = branching
    return [-1] + [0] * k1 + [1 + i for i in range(k1) for _ in range(k2)]


def generate_tree(pair: ToyPair, seed: int, branching: tuple[int, int], stats: dict | None = None) -> np.ndarray:
    """Counts of generated sequences, speculating with full trees of i.i.d. siblings."""
    k1, k2 = branching
    parents = full_tree_parents(branching)
    parent_idx = torch.tensor(parents[1:])
    g = gen(seed)
    ctx = torch.tensor(PROMPT).repeat(N_SEQUENCES, 1)
    out: list[list[int]] = [[] for _ in range(N_SEQUENCES)]
    active = list(range(N_SEQUENCES))
    while active:
        a, b = ctx[active, 0], ctx[active, 1]
        m = len(active)
        level1 = sample(pair.draft[a, b][:, None, :].expand(m, k1, V), g)  # [m, k1]
        level2 = sample(pair.draft[b[:, None], level1][:, :, None, :].expand(m, k1, k2, V), g)
        tokens = torch.cat([b[:, None], level1, level2.reshape(m, k1 * k2)], 1)  # [m, N]
        # The token before each node: the parent's token, or a for the root.
        before = torch.cat([a[:, None], tokens[:, parent_idx]], 1)
        target_rows = pair.target[before, tokens]  # [m, N, V]
        draft_rows = pair.draft[before, tokens].clone()
        draft_rows[:, 1 + k1 :] = math.nan  # leaves' rows must never be read
        for k, s in enumerate(active):
            tree = TokenTree(tokens[k], parents)
            v = verify_sampling(tree, target_rows[k], draft_rows[k], g)
            new = v.accepted_tokens(tree) + [v.next_token]
            if stats is not None:
                stats[len(v.accepted)] = stats.get(len(v.accepted), 0) + 1
                if v.accepted and v.accepted[0] != 1:
                    stats["later_sibling"] = stats.get("later_sibling", 0) + 1
            out[s] += new
            ctx[s] = torch.tensor(([int(ctx[s, 1])] + new)[-2:])
        active = [s for s in active if len(out[s]) < LENGTH]
    return np.bincount([encode(o) for o in out], minlength=V**LENGTH)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-squared goodness of fit, pooling the smallest cells until every cell expects
    >= 5. Any sequence of target probability 0 makes the fit fail outright."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    support = probs > 0
    obs, exp = counts[support].astype(float), probs[support] * counts.sum()
    order = np.argsort(exp)
    obs, exp = obs[order], exp[order]
    n_small = int((exp < 5).sum())
    if n_small:
        j = max(n_small, int(np.searchsorted(np.cumsum(exp), 5.0)) + 1)
        obs = np.concatenate([[obs[:j].sum()], obs[j:]])
        exp = np.concatenate([[exp[:j].sum()], exp[j:]])
    exp *= obs.sum() / exp.sum()
    return float(chisquare(obs, exp).pvalue)


def test_chi2_helper_pools_and_rejects_impossible_cells():
    probs = np.array([0.5, 0.3, 0.19, 0.0099, 0.0001, 0.0])
    counts = np.round(probs * 1000).astype(int)
    assert chi2_pvalue(counts, probs) > 0.5
    assert chi2_pvalue(counts + np.array([0, 0, 0, 0, 0, 1]), probs) == 0.0


SAMPLING_SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.9, top_p=0.85),
    SamplingParams(temperature=1.3, top_k=4, top_p=0.9),
]


@pytest.mark.parametrize("params", SAMPLING_SETTINGS, ids=["t1", "t0.9-p0.85", "t1.3-k4-p0.9"])
def test_chain_sampling_is_lossless(params):
    pair = toy_pair(params)
    counts = generate_chain(pair, seed=1)
    assert chi2_pvalue(counts, pair.exact()) > 1e-3


def test_chain_sampling_with_greedy_draft_is_lossless():
    pair = toy_pair(SamplingParams(temperature=0.8))
    counts = generate_chain(pair, seed=2, greedy_draft=True)
    assert chi2_pvalue(counts, pair.exact()) > 1e-3


@pytest.mark.parametrize(
    "branching,params",
    [((3, 2), SAMPLING_SETTINGS[0]), ((2, 3), SAMPLING_SETTINGS[1])],
    ids=["3x2-t1", "2x3-t0.9-p0.85"],
)
def test_tree_sampling_is_lossless(branching, params):
    pair = toy_pair(params)
    stats: dict = {}
    counts = generate_tree(pair, seed=3, branching=branching, stats=stats)
    assert chi2_pvalue(counts, pair.exact()) > 1e-3
    # Every path through the rule was exercised: rejections at the root, acceptances
    # down to the bonus token, and siblings accepted after an earlier one was rejected.
    assert min(stats.get(0, 0), stats.get(1, 0), stats.get(2, 0), stats.get("later_sibling", 0)) > 200


def broken_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p  # the classic bug: resample from p after a rejection


def broken_accept(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    return (p_x / q_x).clamp(max=1.0).sqrt()  # accepts too often where p < q


@pytest.mark.parametrize("params", SAMPLING_SETTINGS[:2], ids=["t1", "t0.9-p0.85"])
@pytest.mark.parametrize("kind", ["chain", "tree"])
@pytest.mark.parametrize(
    "name,broken",
    [("residual_distribution", broken_residual), ("acceptance_probability", broken_accept)],
)
def test_statistical_test_detects_broken_rules(monkeypatch, kind, name, broken, params):
    monkeypatch.setattr(acceptance, name, broken)
    pair = toy_pair(params)
    counts = generate_chain(pair, seed=1) if kind == "chain" else generate_tree(pair, seed=3, branching=(3, 2))
    assert chi2_pvalue(counts, pair.exact()) < 1e-6
