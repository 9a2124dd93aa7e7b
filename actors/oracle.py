"""A drafter of controlled acceptance and cost, for benchmarking the pipelines (greedy only).

`OracleRunner` stands in for `ModelRunner` on the drafting side. It knows the target's
greedy output (`reference`: prompt + the target's continuation, as the target alone made
it) and, at each position, drafts the reference token with probability `acceptance`,
otherwise another token (uniform over the rest of the vocabulary). The decision at a
position depends only on (position, seed), so the sync and async pipelines see the very
same acceptance pattern. Beyond the reference it drafts random tokens.

Each forward (`feed`, and each drafted token of `propose`) sleeps `step_cost_s`: a drafter
on its own device, which costs wall time but no cores of this machine. `feed` returns
logits whose argmax is the drafted token, so it is only meaningful under greedy decoding:
under sampling those logits are not a real draft distribution worth benchmarking.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from actors.runner import Proposal
from decoding.draft_length import DraftLengthPolicy
from decoding.sampling import SamplingParams
from decoding.tree import TokenTree


class OracleRunner:
    def __init__(self, reference: Sequence[int], vocab_size: int, acceptance: float, step_cost_s: float = 0.0,
                 seed: int = 0):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        if step_cost_s < 0:
            raise ValueError(f"step_cost_s must be >= 0, got {step_cost_s}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.reference, self.acceptance = list(reference), float(acceptance)
        self.step_cost_s, self.seed, self._vocab = float(step_cost_s), int(seed), int(vocab_size)
        self.tokens: list[int] = []

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def draft_at(self, position: int) -> int:
        """The token drafted at `position` (0-based in prompt + output); a pure function."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + position) % 2**63)
        coin = torch.rand((), generator=gen).item()
        other = int(torch.randint(self._vocab - 1, (), generator=gen))
        if position >= len(self.reference):
            return other
        right = self.reference[position]
        return right if coin < self.acceptance else (right + 1 + other) % self._vocab

    def reset(self, max_len: int | None = None) -> None:
        self.tokens = []

    def sync(self, context: Sequence[int]) -> list[int]:
        """Keep the longest common prefix with `context`; return the tokens still to feed."""
        n, limit = 0, min(len(self.tokens), len(context))
        while n < limit and self.tokens[n] == context[n]:
            n += 1
        del self.tokens[n:]
        return list(context[n:])

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """One drafter forward: logits [V] whose argmax is the draft for the next position."""
        if self.step_cost_s:
            time.sleep(self.step_cost_s)
        self.tokens.extend(int(t) for t in tokens)
        logits = torch.zeros(self._vocab)
        logits[self.draft_at(len(self.tokens))] = 20.0
        return logits

    def propose(self, context: Sequence[int], params: SamplingParams, policy: DraftLengthPolicy, max_depth: int,
                width: int = 1, generator: torch.Generator | None = None) -> Proposal:
        """A chain, as `ModelRunner.propose` drafts it; confidence = the acceptance rate."""
        if not params.greedy or width != 1:
            raise ValueError("OracleRunner drafts greedy chains only (temperature 0, tree width 1)")
        start = time.perf_counter()
        logits = self.feed(self.sync(context[:-1]) + [context[-1]])
        drafts, accept_probs = [], []
        while True:
            drafts.append(int(logits.argmax()))
            accept_probs.append(self.acceptance * (accept_probs[-1] if accept_probs else 1.0))
            if len(drafts) >= max_depth or not policy.keep_drafting(len(drafts), accept_probs):
                break
            logits = self.feed(drafts[-1:])
        tree = TokenTree.chain(context[-1], drafts)
        return Proposal(tree, None, sum(accept_probs), len(drafts), time.perf_counter() - start)
