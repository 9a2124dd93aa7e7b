"""Prompt lookup (`--draft ngram`): drafts that cost no model at all.

The longest suffix of a sequence's tokens (up to `max_ngram`) that occurred before, in
the prompt or the output so far, is looked up; what followed its latest occurrence is the
draft. Code edits, quotes, repeated identifiers and boilerplate make such matches common,
and a miss costs only the extra rows of the verify (vLLM's `ngram`, llama.cpp's lookup
and Hugging Face's `prompt_lookup_num_tokens` draft the same way).

The draft tokens are chosen, not sampled: sampling verifies them as point-mass proposals
(`decoding.acceptance.verify_sampling_point_mass`), which is exact. How many to verify
comes from the target's measured verify costs and the sequence's acceptance so far:
drafting is free, but each verified token is not, least of all on a quantized target.
A match of one token is a far weaker guess than a match of three, so acceptance is learned
per matched length, across requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.drafters.chains import expected_tokens
from decoding.acceptance import Verdict
from decoding.draft_length import CostModel
from decoding.round import Draft
from decoding.sequence import Sequence
from decoding.tree import TokenTree

MAX_NGRAM = 3  # longest suffix looked up (vLLM's and llama.cpp's defaults are 3-4)
MIN_NGRAM = 1
# A matched length judged not worth drafting is still tried once in this many matches,
# so an estimate learned on other text can recover (else it would never be observed again).
RETRY_EVERY = 16


class NgramIndex:
    """Where each n-gram of a token list last ended, kept up to date as tokens are appended."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in `last_end`

    def update(self, tokens: list[int]) -> None:
        """Index the n-grams ending at every position but the last (the suffix to look up
        must not find itself)."""
        for end in range(self.indexed, len(tokens) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self.last_end[tuple(tokens[end - n + 1:end + 1])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)

    def match(self, tokens: list[int], limit: int) -> tuple[int, list[int]]:
        """(length of the longest suffix of `tokens` that occurred before, up to `limit`
        tokens that followed its latest earlier occurrence); (0, []) when none did."""
        self.update(tokens)
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            end = self.last_end.get(tuple(tokens[-n:]))
            if end is not None:
                return n, tokens[end + 1:end + 1 + limit]
        return 0, []


@dataclass
class Acceptance:
    """Decayed accepted / tried drafts: the geometric per-token acceptance (as `Sequence` keeps)."""
    hits: float = 1.5  # a prior worth 3 tries at 0.5
    tries: float = 3.0

    @property
    def rate(self) -> float:
        return self.hits / self.tries

    def observe(self, accepted: int, drafted: int) -> None:
        self.hits = 0.9 * self.hits + accepted
        self.tries = 0.9 * self.tries + accepted + (accepted < drafted)


class NgramDrafter:
    def __init__(self, max_draft: int, verify_s: dict[int, float], max_ngram: int = MAX_NGRAM):
        self.max_draft, self.max_ngram = max_draft, max_ngram
        self.tree_room = max_draft + 1
        self.costs = CostModel(verify_s=dict(verify_s))  # the target's, by tokens: sizes a sequence alone
        self.acceptance = {n: Acceptance() for n in range(MIN_NGRAM, max_ngram + 1)}  # by matched length
        # per sequence: (tokens seen, matched length, continuation); until the next lookup it
        # also says what the draft in flight was matched from
        self._found: dict[str, tuple[int, int, list[int]]] = {}
        self._skipped = dict.fromkeys(self.acceptance, 0)  # matches not drafted since the last try, by length

    def start(self, seq: Sequence, hidden: torch.Tensor) -> None:
        seq.draft = NgramIndex(self.max_ngram)

    def release(self, seq: Sequence) -> None:
        seq.draft = None
        self._found.pop(seq.id, None)

    def _lookup(self, seq: Sequence) -> tuple[float, list[int]]:
        """(acceptance of a match this long, the continuation), looked up once per committed
        length: the scheduler's estimate and the proposal ask for the same one."""
        tokens = seq.tokens
        found = self._found.get(seq.id)
        if found is None or found[0] != len(tokens):
            found = (len(tokens), *seq.draft.match(tokens, self.max_draft))
            self._found[seq.id] = found
        n, cont = found[1], found[2]
        return (self.acceptance[n].rate if n else 0.0), cont[:max(0, seq.remaining - 1)]

    def _alone(self, acceptance: float, found: int) -> int:
        """Depth for a sequence decoding alone: the most expected tokens per verify second."""
        best, best_rate = 0, 1.0 / self.costs.verify(1)
        for k in range(1, found + 1):
            rate = expected_tokens(acceptance, k) / self.costs.verify(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def propose(self, seqs: list[Sequence], k: int | None) -> dict[str, Draft]:
        out = {}
        for s in seqs:
            acceptance, found = self._lookup(s)
            depth = self._alone(acceptance, len(found)) if k is None else min(k, len(found))
            n = self._found[s.id][1]
            if n and found and depth == 0:
                self._skipped[n] += 1
                if self._skipped[n] >= RETRY_EVERY:
                    self._skipped[n], depth = 0, 1
            if depth > 0:
                out[s.id] = Draft(TokenTree.chain(s.tokens[-1], found[:depth]))
        return out

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        if draft is not None and draft.drafted:
            self.acceptance[self._found[seq.id][1]].observe(len(verdict.accepted), draft.drafted)

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        found = [self._lookup(s) for s in seqs]
        ks = [min(k, len(cont)) for _, cont in found]
        return (sum(expected_tokens(a, kk) for (a, _), kk in zip(found, ks)), 0.0, sum(kk + 1 for kk in ks))

    def depths(self, max_draft: int) -> list[int]:
        return list(range(1, max_draft + 1))
