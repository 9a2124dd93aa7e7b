"""What runs next: admissions by capacity, prompt chunks to prefill, how far to draft.

The draft depth of a round is chosen for the whole batch from measured costs: for each
depth k the drafter offers, it estimates the tokens the round would commit and what
drafting costs (`Drafter.estimate`); the verifier's measured costs give the verify
forward over that many rows. The k with the most expected tokens per second wins,
k = 0 (no speculation) included: on a CPU a 16-sequence batch is already
compute-bound, and drafting then only costs (vLLM's and SGLang's adaptive speculation
make the same call). While prompts wait to be prefilled nobody drafts: their time to
first token comes first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from actors.runner import PREFILL_CHUNK
from actors.verifier import VerifyCosts
from decoding.round import Drafter
from decoding.sequence import Sequence, Status


@dataclass
class BatchConfig:
    max_seqs: int = 16  # sequences decoding at once (cache slots per model)
    kv_tokens: int = 65536  # KV entries reserved over all running sequences
    prefill_tokens: int = PREFILL_CHUNK  # prompt tokens per step (whole chunks; at least one)
    max_draft: int = 8
    draft_length: int | None = None  # fixed draft length; None: chosen per round from costs
    # Drafting must beat k = 0 by this fraction of tokens/s to be chosen: the cost model's
    # error (acceptance estimates, the trees' cost prior) would otherwise make rounds that
    # are called slightly positive but lose (0.95x at 4 requests in BENCHMARKS.md).
    margin: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_seqs", "kv_tokens", "prefill_tokens", "max_draft"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must lie in [0, 1), got {self.margin}")
        if self.draft_length is not None and not 0 <= self.draft_length <= self.max_draft:
            raise ValueError(f"draft_length must lie in [0, max_draft={self.max_draft}], got {self.draft_length}")


class Scheduler:
    def __init__(self, cfg: BatchConfig, drafter: Drafter, costs: VerifyCosts):
        self.cfg, self.drafter, self.costs = cfg, drafter, costs
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.reserved = 0  # KV entries promised to admitted sequences
        self.last_draft_length = 0
        # What this engine's drafts are worth on the requests it serves: finished sequences'
        # acceptance, averaged. A joining sequence starts from it instead of a fixed guess.
        self.acceptance = Sequence.acceptance

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, free_slots: int) -> list[Sequence]:
        """First come, first served, while a slot and the KV budget allow."""
        joined = []
        while (self.waiting and len(joined) < free_slots
               and self.reserved + self.waiting[0].kv_tokens <= self.cfg.kv_tokens):
            seq = self.waiting.popleft()
            self.reserved += seq.kv_tokens
            seq.status = Status.PREFILLING
            self.prefilling.append(seq)
            joined.append(seq)
        return joined

    def remove(self, seq: Sequence) -> None:
        if seq.stats.verify_rounds >= 3:  # enough drafting rounds to say something
            self.acceptance = 0.7 * self.acceptance + 0.3 * seq.acceptance
        for queue in (self.prefilling, self.running):
            if seq in queue:
                queue.remove(seq)
                self.reserved -= seq.kv_tokens
        if seq in self.waiting:
            self.waiting.remove(seq)

    def prefill_chunks(self) -> list[tuple[Sequence, list[int]]]:
        """Whole `PREFILL_CHUNK`-aligned chunks, oldest request first, up to the step's budget
        (a prompt is chunked exactly as it would be alone)."""
        chunks, budget = [], self.cfg.prefill_tokens
        for seq in self.prefilling:
            chunk = seq.prompt[seq.prefilled:seq.prefilled + PREFILL_CHUNK]
            if chunks and len(chunk) > budget:
                break
            chunks.append((seq, chunk))
            budget -= len(chunk)
            if budget <= 0:
                break
        return chunks

    def started(self, seq: Sequence) -> None:
        seq.acceptance = self.acceptance  # a prior worth 3 tries, as `Sequence` starts with
        seq.acc_hits, seq.acc_tries = 3 * self.acceptance, 3.0
        self.prefilling.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def draft_length(self) -> int | None:
        """k for this round (0: every sequence steps with the target alone; None: one
        sequence decodes alone, and its drafter drafts as far as its own per-token policy
        finds worth it, as a single-request loop would)."""
        spec = [s for s in self.running if s.drafting]
        if not spec or not self.drafter.depths(self.cfg.max_draft):
            k = 0
        elif self.cfg.draft_length is not None:
            k = self.cfg.draft_length
        elif self.prefilling or self.waiting:
            k = 0  # prompts are waiting to be read: drafting (and a draft's catch-up) would delay them
        elif len(self.running) == 1:
            k = None
        else:
            k = self._best_k(spec)
        self.last_draft_length = k
        return k

    def _best_k(self, spec: list[Sequence]) -> int:
        plain = len(self.running) - len(spec)
        best_k, best_rate = 0, len(self.running) / self.costs.plain.verify(len(self.running))
        for k in self.drafter.depths(self.cfg.max_draft):
            tokens, draft_s, rows = self.drafter.estimate(spec, k)
            rate = (plain + tokens) / (draft_s + self.costs.trees.verify(plain + rows))
            if rate > best_rate * (1 + (self.cfg.margin if best_k == 0 else 0.0)):
                best_k, best_rate = k, rate
        return best_k

    def state(self) -> dict:
        return {"running": len(self.running), "prefilling": len(self.prefilling), "waiting": len(self.waiting),
                "kv_reserved": self.reserved, "kv_budget": self.cfg.kv_tokens, "max_seqs": self.cfg.max_seqs,
                "draft_length": self.last_draft_length, "acceptance": round(self.acceptance, 3)}
