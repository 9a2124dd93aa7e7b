"""What runs next: admissions by capacity, prompt chunks to prefill, how far to draft.

The draft length of a round is chosen for the whole batch from measured costs: with B
running sequences, drafting k tokens each costs k batched draft steps plus one target
forward over the verified rows, and yields for each sequence 1 + a + ... + a^k tokens
in expectation (a = its acceptance rate). The k with the most expected tokens per second
wins, k = 0 (no speculation) included: on a CPU a 16-sequence batch is already
compute-bound, and drafting then only costs (vLLM's and SGLang's adaptive speculation
make the same call). While prompts wait to be prefilled nobody drafts: their time to
first token comes first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from actors.runner import PREFILL_CHUNK
from cluster.batching.runner import BatchCosts
from cluster.batching.sequence import Sequence, SlotPool, Status


@dataclass
class BatchConfig:
    max_seqs: int = 16  # sequences decoding at once (cache slots per model)
    kv_tokens: int = 65536  # KV entries reserved over all running sequences
    prefill_tokens: int = PREFILL_CHUNK  # prompt tokens per step (whole chunks; at least one)
    max_draft: int = 8
    draft_length: int | None = None  # fixed draft length; None: chosen per round from costs

    def __post_init__(self) -> None:
        for name in ("max_seqs", "kv_tokens", "prefill_tokens", "max_draft"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.draft_length is not None and not 0 <= self.draft_length <= self.max_draft:
            raise ValueError(f"draft_length must lie in [0, max_draft={self.max_draft}], got {self.draft_length}")


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one round commits when drafting k with per-token acceptance `acceptance`."""
    a = min(acceptance, 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


class Scheduler:
    def __init__(self, cfg: BatchConfig, has_draft: bool, costs: BatchCosts):
        self.cfg, self.has_draft, self.costs = cfg, has_draft, costs
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.reserved = 0  # KV entries promised to admitted sequences
        self.last_draft_length = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, pool: SlotPool) -> list[Sequence]:
        """First come, first served, while a slot and the KV budget allow."""
        joined = []
        while self.waiting and len(joined) < pool.available and self.reserved + self.waiting[0].kv_tokens <= self.cfg.kv_tokens:
            seq = self.waiting.popleft()
            self.reserved += seq.kv_tokens
            seq.status = Status.PREFILLING
            self.prefilling.append(seq)
            joined.append(seq)
        return joined

    def remove(self, seq: Sequence) -> None:
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
        self.prefilling.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def draft_length(self) -> int:
        """k for this round (0: every sequence steps with the target alone)."""
        spec = [s for s in self.running if s.speculative and s.remaining > 1]
        if not self.has_draft or not spec:
            k = 0
        elif self.cfg.draft_length is not None:
            k = self.cfg.draft_length
        elif self.prefilling or self.waiting:
            k = 0  # prompts are waiting to be read: drafting (and a draft's catch-up) would delay them
        else:
            k = self._best_k(spec)
        self.last_draft_length = k
        return k

    def _best_k(self, spec: list[Sequence]) -> int:
        """A draft cache that lags (its prompt unread, or rounds without drafting) must
        catch up first: that cost is charged in proportion to the share of the sequence's
        remaining tokens this round yields, since later rounds reuse what it read."""
        target, verify, draft = self.costs.target, self.costs.verify, self.costs.draft
        plain = len(self.running) - len(spec)
        best_k, best_rate = 0, len(self.running) / target.verify(len(self.running))
        for k in range(1, self.cfg.max_draft + 1):
            ks = [min(k, s.remaining - 1) for s in spec]
            gains = [expected_tokens(s.acceptance, kk) for s, kk in zip(spec, ks)]
            lag = sum((len(s.tokens) - len(s.draft_tokens) - 1) * min(1.0, g / s.remaining) for s, g in zip(spec, gains))
            tokens = plain + sum(gains)
            rows = plain + sum(kk + 1 for kk in ks)
            seconds = k * draft.verify(len(spec)) + verify.verify(rows) + lag * self.costs.catch_up_s
            if tokens / seconds > best_rate:
                best_k, best_rate = k, tokens / seconds
        return best_k

    def state(self) -> dict:
        return {"running": len(self.running), "prefilling": len(self.prefilling), "waiting": len(self.waiting),
                "kv_reserved": self.reserved, "kv_budget": self.cfg.kv_tokens, "max_seqs": self.cfg.max_seqs,
                "draft_length": self.last_draft_length}
