"""SSD for a batched verifier (`pipeline: ssd` with batching): the draft server pre-drafts
each answered sequence's next round for the verdict's likeliest outcomes while the target
verifies (the outcomes and why it stays lossless: `actors.ssd`).

After answering a round, for every sequence it drafted for:
1. one batched draft step from the end of each chain gives the distribution after it
   (where the bonus is guessed when all drafts are kept);
2. each sequence's outcomes are ranked (`likely_outcomes`), and rank r of every sequence
   is drafted in one batched pass (a wave), r = 0, 1, ...: each sequence's draft cache is
   cropped to where the outcome's context leaves the one it holds, and catches up from there;
3. the waves stop as soon as the verifier's next call is waiting (`interrupted`, asked
   after every draft step), so they delay an answer by at most one draft step; when
   sampling, a chain cut short there is dropped (drafted afresh it would be longer).
The next call names what was committed; a pre-draft for exactly that is the answer (a
hit: its rank goes back in `CandidateTree.pre_drafted`), else the round is drafted as sync.

A seeded request reproduces whatever the timing: each round's draft, pre-drafted or not,
draws from a stream seeded by the request's draft seed and the committed length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from actors.draft_server import DraftServer, _Mirror
from actors.ssd import FANOUT, likely_outcomes
from decoding.request import make_generator
from decoding.round import Draft
from decoding.sequence import Sequence
from decoding.tree import TokenTree
from protocol import DraftCall


@dataclass
class _Pending:
    """A sequence's pre-drafts for the round in flight."""
    keep: float = 0.6  # measured rate at which the target keeps a draft whose predecessors it kept
    depth: int = 1  # the last call's depth and mode: what the next call will most likely ask
    alone: bool = False
    # tokens after the root -> (rank, the draft, whether the next call cut it short)
    branches: dict[tuple[int, ...], tuple[int, Draft, bool]] = field(default_factory=dict)


def round_generator(seed: int, committed: int):
    """The draft's stream for the round drafted after `committed` tokens of a seeded request."""
    return make_generator((seed ^ (committed * 0x9E3779B97F4A7C15)) % (2**63 - 1))


class SsdDraftServer(DraftServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_rows = True
        self.pending_of: dict[str, _Pending] = {}
        self.hit_ranks = [0] * FANOUT
        self.predrafted = self.wasted = 0

    # ---- the next call: a hit or a miss
    def _ahead_hit(self, call: DraftCall) -> Draft | None:
        mirror, seq = self.mirrors[call.session_id], self.mirrors[call.session_id].seq
        if seq.cfg.seed is not None:
            seq.generator = round_generator(seq.cfg.seed, len(seq.prompt))
        p = self.pending_of.setdefault(call.session_id, _Pending())
        p.depth, p.alone = call.depth, call.alone
        branches, p.branches = p.branches, {}
        if mirror.last is None:
            return None
        drafted, committed = mirror.last.tree.tokens.tolist()[1:], seq.prompt[mirror.root + 1:]
        kept = 0
        while kept < min(len(drafted), len(committed)) and drafted[kept] == committed[kept]:
            kept += 1
        if drafted:
            p.keep = 0.7 * p.keep + 0.3 * kept / min(kept + 1, len(drafted))
        if not branches:
            return None
        found = branches.pop(tuple(committed), None)
        self.wasted += sum(d.drafted for _, d, _ in branches.values())
        if found is None or found[1].drafted == 0:
            self.misses += 1
            return None
        rank, draft, cut = found
        self.hits += 1
        self.hit_ranks[rank] += 1
        self.ranks[call.session_id] = rank
        self._keep_what_was_kept(mirror)  # the cache may hold another branch: crop to what is committed
        want = min(call.depth, call.remaining - 1)
        depth = min(draft.drafted, want)
        tokens, rows = draft.tree.tokens[:depth + 1].tolist(), draft.rows[:depth]
        q = draft.q[:depth + 1] if draft.q is not None else None
        if cut and q is None and depth < want:  # greedy, cut short by this call: draft the rest now
            more = self._extend(seq, tokens[1:], want - depth)
            if more is not None:  # never past the call's depth: the verifier checks the tree's room
                tokens += more.tree.tokens[1:want - depth + 1].tolist()
                rows = torch.cat([rows, more.rows[:want - depth]])
        return Draft(TokenTree.chain(tokens[0], tokens[1:]), q, rows=rows)

    def _extend(self, seq: Sequence, chain: list[int], k: int | None) -> Draft | None:
        """Draft on from the end of `chain` (drafted after the committed tokens)."""
        base, cfg = seq.prompt, seq.cfg
        self._enter(seq, base + chain, len(chain))
        try:
            return self.drafter.propose([seq], k, keep_rows=True).get(seq.id)
        finally:
            seq.prompt, seq.cfg = base, cfg
            seq.draft.verified = min(seq.draft.verified, len(base) - 1)

    # ---- while the target verifies
    def after_replies(self) -> None:
        sessions, self.answered = self.answered, []
        group = [m for s in sessions if (m := self.mirrors.get(s)) is not None and m.last is not None
                 and m.last.drafted > 0 and m.last.rows is not None and s in self.pending_of]
        if not group or self.interrupted():
            return
        bases = {m.seq.id: (list(m.seq.prompt), m.seq.cfg, m.seq.generator) for m in group}
        try:
            plans = self._plan(group, bases)
            for rank in range(FANOUT):
                wave = [(m, o) for m in group if rank < len(plans[m.seq.id])
                        and (o := plans[m.seq.id][rank]) is not None]
                if not wave or self.interrupted():
                    break
                self._wave(wave, rank, bases)
        finally:
            for m in group:
                m.seq.prompt, m.seq.cfg, m.seq.generator = bases[m.seq.id]
                m.seq.draft.verified = min(m.seq.draft.verified, len(m.seq.prompt) - 1)

    def _plan(self, group: list[_Mirror], bases: dict) -> dict[str, list]:
        """Each sequence's outcomes to pre-draft for, likeliest first (None: one that does
        not fit what the request may still emit or the cache)."""
        chains = {m.seq.id: m.last.tree.tokens[1:].tolist() for m in group}
        room = [m for m in group if m.seq.remaining - len(chains[m.seq.id]) >= 2]
        for m in room:  # one draft step past each chain: the distribution the bonus comes from
            self._enter(m.seq, m.seq.prompt + chains[m.seq.id], len(chains[m.seq.id]))
        after = self.drafter.propose([m.seq for m in room], 1, keep_rows=True) if room else {}
        plans = {}
        for m in group:
            sid, p = m.seq.id, self.pending_of[m.seq.id]
            m.seq.prompt, m.seq.cfg, _ = bases[sid]
            row = after[sid].rows[0] if sid in after and after[sid].rows is not None else None
            outcomes = likely_outcomes(chains[sid], m.last.rows, row, p.keep)
            plans[sid] = [o if self._fits(m, o, p) else None for o in outcomes]
        return plans

    def _fits(self, m: _Mirror, outcome, p: _Pending) -> bool:
        return (m.seq.remaining - outcome.kept - 1 >= 2
                and len(m.seq.prompt) + outcome.kept + p.depth + 3 <= self.max_len)

    def _wave(self, wave: list, rank: int, bases: dict) -> None:
        """Rank `rank`'s outcome of every sequence in `wave`, one batched pass per kind."""
        by_kind: dict[tuple[int, bool], list[Sequence]] = {}
        keys = {}
        for m, o in wave:
            base, cfg, _ = bases[m.seq.id]
            chain = m.last.tree.tokens[1:].tolist()
            m.seq.prompt, m.seq.cfg = base, cfg
            self._enter(m.seq, base + chain[:o.kept] + [o.bonus], o.kept + 1)
            if cfg.seed is not None:
                m.seq.generator = round_generator(cfg.seed, len(m.seq.prompt))
            p = self.pending_of[m.seq.id]
            keys[m.seq.id] = (p, tuple(chain[:o.kept] + [o.bonus]))
            by_kind.setdefault((p.depth, p.alone), []).append(m.seq)
        for (depth, alone), seqs in by_kind.items():
            cut = []

            def stop() -> bool:
                cut.append(self.interrupted())
                return cut[-1]

            drafts = self.drafter.propose(seqs, None if alone else depth, keep_rows=True, stop=stop)
            for s in seqs:
                d = drafts.get(s.id)
                if d is None:
                    continue
                self.predrafted += d.drafted
                # Sampling: a chain the next call cut short is dropped (drafted afresh it
                # would be longer, and a seeded request must not hang on timing). Greedy
                # output is the target's whatever the drafts: a short chain still saves a round's drafting.
                sampled = not s.cfg.sampling.greedy
                if sampled and any(cut) and (alone or d.drafted < min(depth, s.remaining - 1)):
                    self.wasted += d.drafted
                    continue
                p, key = keys[s.id]
                p.branches[key] = (rank, d, any(cut))

    @staticmethod
    def _enter(seq: Sequence, context: list[int], added: int) -> None:
        """Make `context` the sequence's committed tokens for a pre-draft (`added` past its
        own), its draft cache cropped to where the two part (it catches up from there)."""
        st = seq.draft
        n = 0
        limit = min(len(st.tokens), len(context) - 1)
        while n < limit and st.tokens[n] == context[n]:
            n += 1
        st.cache.crop(n)
        del st.tokens[n:]
        st.verified = min(st.verified, n)
        seq.prompt = context
        seq.cfg = dataclasses.replace(seq.cfg, max_new_tokens=seq.cfg.max_new_tokens - added)

    def release(self, session: str) -> None:
        self.pending_of.pop(session, None)
        super().release(session)
