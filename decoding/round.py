"""One speculative round for a batch of sequences: draft, verify, accept, commit.

This is the whole decode loop of every batched method (gpt-fast's, for many sequences):

    drafts = drafter.propose(seqs, k)          # a token tree per sequence, or none
    scored = verifier.score(seqs, trees)       # one target forward over every tree
    verdict = accept(tree, logits, q, ...)     # per sequence: greedy or lossless sampling
    verifier.commit(seq, tree, verdict)        # keep the accepted path's KV, drop the rest
    drafter.observe(seq, draft, verdict, h)    # the drafter learns what was kept

A Drafter is anything that proposes trees (a draft model, heads on the target's hidden
states, no drafter at all); a Verifier is the target. Neither knows about Ray, ZeroMQ or
HTTP, and the round knows nothing of how either runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from decoding.acceptance import Verdict, verify_greedy, verify_sampling, verify_sampling_point_mass
from decoding.logprobs import TokenLogprob, logprobs_of
from decoding.request import next_token
from decoding.sampling import logits_to_probs
from decoding.sequence import Sequence
from decoding.tree import TokenTree


@dataclass
class Draft:
    """A drafter's proposal for one sequence."""
    tree: TokenTree  # node 0 = the sequence's newest committed token
    # [N, V]: row i = the distribution node i's children were drawn from (sampling).
    # None: the candidates were chosen, not sampled (greedy drafting, heads' top-k):
    # sampling then verifies each as a point-mass proposal, which is exact too.
    q: torch.Tensor | None = None
    predicted: float = 0.0  # expected accepted drafts, by the drafter's own confidence
    # `keep_rows`: row i = the draft's distribution the chain's token at depth i + 1 came
    # from, sampling or not (where SSD guesses the verdict's outcomes)
    rows: torch.Tensor | None = None

    @property
    def drafted(self) -> int:
        return self.tree.size - 1


@dataclass
class Committed:
    """What one step added to a sequence (or why the sequence failed in it)."""
    seq: Sequence
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # this sequence's own part of the step raised: it alone ends


def _failed(seq: Sequence, exc: Exception) -> Committed:
    return Committed(seq, [], error=f"{type(exc).__name__}: {exc}")


class Drafter(Protocol):
    tree_room: int  # KV entries a sequence's verify may take beyond its committed tokens

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """The prompt is in the target's cache; `hidden` = the target's state at its last token."""

    def propose(self, seqs: list[Sequence], k: int | None) -> dict[str, Draft]:
        """Trees of depth <= k for the drafting sequences among `seqs` (by id). k None: one
        sequence decodes alone and the drafter sizes its tree by its own per-token policy."""

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        """After commit: `hidden` = the target's state at the newest committed token."""

    def release(self, seq: Sequence) -> None:
        """The sequence left: free what the drafter kept for it."""

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        """Drafting depth k for `seqs`: (expected tokens committed, drafting seconds, verify rows)."""

    def depths(self, max_draft: int) -> list[int]:
        """The depths worth considering (the scheduler weighs each against k = 0)."""


class Verifier(Protocol):
    def score(self, seqs: list[Sequence], trees: list[TokenTree]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence (hidden [N, d], logits [N, V]) for every node of its tree, one forward."""

    def commit(self, seq: Sequence, tree: TokenTree, accepted: list[int]) -> None:
        """Keep the root's and the accepted nodes' KV; forget the other branches."""


def accept(seq: Sequence, draft: Draft | None, logits: torch.Tensor) -> Verdict:
    """The acceptance rule: exact greedy match, or recursive rejection sampling (lossless)."""
    params = seq.cfg.sampling
    if draft is None or draft.drafted == 0:
        return Verdict([], next_token(logits[0], params, seq.generator))
    if params.greedy:
        return verify_greedy(draft.tree, logits)
    p = logits_to_probs(logits, params)
    if draft.q is None:
        return verify_sampling_point_mass(draft.tree, p, seq.generator)
    return verify_sampling(draft.tree, p, draft.q, seq.generator)


def speculative_round(seqs: list[Sequence], drafter: Drafter, verifier: Verifier, k: int | None) -> list[Committed]:
    """Draft up to k tokens for each drafting sequence (k None: as far as the drafter's own
    policy goes), verify every tree in one target forward, accept per sequence with its own
    sampling parameters and random stream, commit."""
    drafts = drafter.propose([s for s in seqs if s.drafting], k) if k != 0 else {}
    trees = [drafts[s.id].tree if s.id in drafts else TokenTree.chain(s.tokens[-1], []) for s in seqs]
    done = []
    for seq, tree, (hidden, logits) in zip(seqs, trees, verifier.score(seqs, trees)):
        # What follows is one sequence's own: if it raises, that sequence ends with the error
        # (the engine frees it) and the others' rounds go on. The batched forwards above
        # cannot say whose input broke them; the engine fails their whole step.
        try:
            done.append(_settle(seq, drafts.get(seq.id), tree, hidden, logits, drafter, verifier))
        except Exception as exc:
            done.append(_failed(seq, exc))
    return done


def _settle(seq: Sequence, draft: Draft | None, tree: TokenTree, hidden: torch.Tensor, logits: torch.Tensor,
            drafter: Drafter, verifier: Verifier) -> Committed:
    """Accept, commit, tell the drafter: one sequence's part of a round."""
    verdict = accept(seq, draft, logits)
    verifier.commit(seq, tree, verdict.accepted)
    new = tree.tokens[verdict.accepted].tolist() + [verdict.next_token]
    kept = seq.append(new)
    st = seq.stats
    st.target_forwards += 1
    if draft is not None and draft.drafted:
        st.verify_rounds += 1
        st.drafted_tokens += draft.drafted
        st.accepted_tokens += len(verdict.accepted)
        seq.observe_acceptance(len(verdict.accepted), draft.tree.depth.max().item())
    if seq.draft is not None:
        drafter.observe(seq, draft, verdict, hidden[verdict.last_node])
    lp = logprobs_of(logits[[0] + verdict.accepted], kept, seq.logprobs) if seq.logprobs is not None and kept \
        else None
    return Committed(seq, kept, lp)


def first_tokens(finished: list[tuple[Sequence, torch.Tensor, torch.Tensor]], drafter: Drafter) -> list[Committed]:
    """Sequences whose prompt is fully read: sample the first token from the last prompt
    position's logits (row 0 of `logits`) and let the drafter start on them."""
    done = []
    for seq, hidden, logits in finished:
        try:
            token = next_token(logits[0], seq.cfg.sampling, seq.generator)
            seq.stats.target_forwards += 1
            kept = seq.append([token])
            if seq.speculative:
                drafter.start(seq, hidden)
            lp = logprobs_of(logits, kept, seq.logprobs) if seq.logprobs is not None and kept else None
            done.append(Committed(seq, kept, lp))
        except Exception as exc:  # as in a round: this sequence alone ends
            done.append(_failed(seq, exc))
    return done
