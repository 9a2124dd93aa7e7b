"""Runs the batch: prompt chunks, drafting, one verify for every sequence, commit.

Nothing here decides what runs: the scheduler hands over the sequences and the draft
length. Acceptance is per sequence (`decoding.acceptance`), with the sequence's own
sampling parameters and random stream, so a request's output is its own whatever else
shares the forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.model import BatchItem, Transformer
from actors.runner import PREFILL_CHUNK
from cluster.batching.sequence import Sequence
from decoding.acceptance import verify_chain_greedy, verify_chain_sampling
from decoding.draft_length import CostModel
from decoding.request import next_token
from decoding.sampling import logits_to_probs, sample


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the target's top alternatives, most likely first


@dataclass
class Committed:
    """What one step added to a sequence."""
    seq: Sequence
    tokens: list[int]
    logprobs: list[TokenLogprob] | None


def _long(tokens: list[int]) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.long)


def logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The target's log-probabilities (of its raw logits, as OpenAI reports them) of the
    committed tokens, row i giving token i."""
    lp = torch.log_softmax(logits[:len(tokens)].float(), dim=-1)
    out = []
    for i, t in enumerate(tokens):
        alts = []
        if top:
            values, ids = lp[i].topk(top)
            alts = list(zip(ids.tolist(), values.tolist()))
        out.append(TokenLogprob(t, float(lp[i, t]), alts))
    return out


@dataclass
class BatchCosts:
    """What forwards cost here, measured at load and then as they run."""
    target: CostModel = field(default_factory=CostModel)  # one target forward of B single tokens, by B
    # one verify forward of B chains, by rows: dearer than as many single tokens (each sequence
    # attends with its own mask); seeded from `target` and learned as rounds run
    verify: CostModel = field(default_factory=CostModel)
    draft: CostModel = field(default_factory=CostModel)  # one draft step, by sequences (one token each)
    catch_up_s: float = 0.01  # per token a draft cache catches up (prefill-like)

    def observe_catch_up(self, seconds: float, tokens: int) -> None:
        self.catch_up_s = 0.7 * self.catch_up_s + 0.3 * seconds / max(tokens, 1)


class BatchRunner:
    def __init__(self, target: Transformer, draft: Transformer | None):
        self.target, self.draft = target, draft
        self.costs = BatchCosts()

    # ---- prompts ------------------------------------------------------------------
    def prefill(self, chunks: list[tuple[Sequence, list[int]]]) -> list[Committed]:
        """Feed one chunk of each sequence's prompt to the target. A sequence whose prompt
        is complete gets its first token. The draft reads the prompt only when it first
        drafts for the sequence (`_catch_up`): under load, when drafting does not pay, the
        draft's prefill is never spent."""
        hidden = self.target.forward_batch([BatchItem(_long(c), s.target_cache, prefill=True) for s, c in chunks])
        done = []
        for (seq, chunk), h in zip(chunks, hidden):
            seq.prefilled += len(chunk)
            if seq.prefilled == len(seq.prompt):
                logits = self.target.logits(h[-1:])
                token = next_token(logits[0], seq.cfg.sampling, seq.generator)
                seq.stats.target_forwards += 1
                done.append(Committed(seq, seq.append([token]), self._logprobs(seq, logits, [token])))
        return done

    # ---- one round ----------------------------------------------------------------
    def step(self, running: list[Sequence], k: int) -> list[Committed]:
        """Draft up to k tokens for each speculating sequence, verify every sequence's
        chain in one target forward, accept per sequence, commit."""
        depth = {s.id: (min(k, s.remaining - 1) if s.speculative and s.draft_cache is not None else 0)
                 for s in running}
        drafts, q_rows = self._draft([s for s in running if depth[s.id] > 0], depth)
        start = time.perf_counter()
        items = [BatchItem(_long(s.tokens[-1:] + drafts.get(s.id, [])), s.target_cache) for s in running]
        hidden = self.target.forward_batch(items)
        logits = self.target.logits(torch.cat(hidden)).split([len(it.tokens) for it in items])
        table = self.costs.verify if drafts else self.costs.target
        table.observe_verify(time.perf_counter() - start, sum(len(it.tokens) for it in items))
        return [self._accept(s, drafts.get(s.id, []), q_rows.get(s.id), lg) for s, lg in zip(running, logits)]

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Feed each draft cache the committed tokens it lacks, but the newest (drafting
        starts from that one): prompt-sized chunks, all sequences in one forward each."""
        while lagging := [s for s in seqs if len(s.tokens) - len(s.draft_tokens) > 1]:
            chunks = [(s, s.tokens[len(s.draft_tokens):len(s.tokens) - 1][:PREFILL_CHUNK]) for s in lagging]
            start = time.perf_counter()
            self.draft.forward_batch([BatchItem(_long(c), s.draft_cache, prefill=True) for s, c in chunks])
            n = sum(len(c) for _, c in chunks)
            self.costs.observe_catch_up(time.perf_counter() - start, n)
            for s, c in chunks:
                s.draft_tokens.extend(c)

    def _draft(self, seqs: list[Sequence], depth: dict[str, int]) -> tuple[dict, dict]:
        """Batched drafting: one token per sequence per step, each step one draft forward."""
        self._catch_up(seqs)
        drafts: dict[str, list[int]] = {s.id: [] for s in seqs}
        q_rows: dict[str, list[torch.Tensor]] = {s.id: [] for s in seqs}
        feed = {s.id: s.tokens[-1] for s in seqs}
        active = list(seqs)
        while active:
            start = time.perf_counter()
            hidden = self.draft.forward_batch([BatchItem(_long([feed[s.id]]), s.draft_cache) for s in active])
            logits = self.draft.logits(torch.cat(hidden))
            self.costs.draft.observe_verify(time.perf_counter() - start, len(active))
            nxt = []
            for s, lg in zip(active, logits):
                s.draft_tokens.append(feed[s.id])
                params = s.cfg.sampling
                if params.greedy:
                    token = int(lg.argmax())
                else:
                    q = logits_to_probs(lg, params)
                    token = int(sample(q, s.generator))
                    q_rows[s.id].append(q)
                drafts[s.id].append(token)
                s.stats.drafted_tokens += 1
                if len(drafts[s.id]) < depth[s.id]:
                    feed[s.id] = token
                    nxt.append(s)
            active = nxt
        return drafts, q_rows

    def _accept(self, seq: Sequence, drafts: list[int], q_rows: list[torch.Tensor] | None,
                logits: torch.Tensor) -> Committed:
        params, g = seq.cfg.sampling, len(drafts)
        if g == 0:
            n, token = 0, next_token(logits[0], params, seq.generator)
        elif params.greedy:
            n, token = verify_chain_greedy(_long(drafts), logits)
        else:
            n, token = verify_chain_sampling(_long(drafts), torch.stack(q_rows), logits_to_probs(logits, params),
                                             seq.generator)
        # The root and the accepted drafts stay in the target cache; the rest goes (a chain: a crop).
        seq.target_cache.crop(seq.target_cache.length - g + n)
        new = drafts[:n] + [token]
        kept = seq.append(new)
        if seq.draft_cache is not None:  # keep the draft's entries that match what was committed
            tokens, m = seq.tokens, 0
            while m < min(len(seq.draft_tokens), len(tokens)) and seq.draft_tokens[m] == tokens[m]:
                m += 1
            seq.draft_cache.crop(m)
            del seq.draft_tokens[m:]
        st = seq.stats
        st.target_forwards += 1
        if g:
            st.verify_rounds += 1
            st.accepted_tokens += n
            # decayed counts of accepted and tried drafts: the geometric rate a = accepted / tried
            seq.acc_hits = 0.8 * seq.acc_hits + n
            seq.acc_tries = 0.8 * seq.acc_tries + n + (n < g)
            seq.acceptance = seq.acc_hits / max(seq.acc_tries, 1e-9)
        return Committed(seq, kept, self._logprobs(seq, logits, kept))

    @staticmethod
    def _logprobs(seq: Sequence, logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob] | None:
        if seq.logprobs is None or not tokens:
            return None
        return logprobs_of(logits, tokens, seq.logprobs)
