"""One request being decoded: its tokens, its cache, its random stream, what its drafter keeps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from decoding.kv_cache import KVCache
from decoding.request import DecodeConfig, GenerationStats, make_generator


class Status(enum.Enum):
    WAITING = "waiting"  # admitted, no cache slot yet
    PREFILLING = "prefilling"  # has a slot; its prompt is going in chunk by chunk
    RUNNING = "running"  # decodes in every round
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request's state. Invariant while running: the target cache holds every committed
    token but the newest (`tokens[-1]`, the root of the next round). `draft` is whatever
    the drafter keeps for this sequence (a draft cache, a hidden state); None when it does
    not draft for it."""

    id: str
    prompt: list[int]
    cfg: DecodeConfig
    speculative: bool
    logprobs: int | None  # None: no logprobs; k >= 0: the chosen token's and the top k
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the target cache
    slot: int | None = None
    cache: KVCache | None = None  # the target's
    draft: Any = None
    generator: torch.Generator = field(init=False)
    stats: GenerationStats = field(default_factory=GenerationStats)
    acceptance: float = 0.7  # running estimate of P(draft token accepted), per sequence
    acc_hits: float = 2.1  # decayed accepted drafts (a prior worth 3 tries at 0.7)
    acc_tries: float = 3.0
    finish_reason: str | None = None
    started_at: float = 0.0

    def __post_init__(self) -> None:
        # Its own random stream: a seeded request samples the same whatever shares the batch.
        self.generator = make_generator(self.cfg.seed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def remaining(self) -> int:
        return self.cfg.max_new_tokens - len(self.output)

    @property
    def kv_tokens(self) -> int:
        """KV slots this request may come to use (reserved at admission)."""
        return self.cfg.cache_room(len(self.prompt))

    @property
    def drafting(self) -> bool:
        """Drafting for it can still pay: its drafter keeps state and more than one token is due."""
        return self.draft is not None and self.remaining > 1

    def observe_acceptance(self, accepted: int, drafted: int) -> None:
        """Decayed counts of accepted and tried drafts: the geometric rate a = accepted / tried."""
        self.acc_hits = 0.8 * self.acc_hits + accepted
        self.acc_tries = 0.8 * self.acc_tries + accepted + (accepted < drafted)
        self.acceptance = self.acc_hits / max(self.acc_tries, 1e-9)

    def append(self, new: list[int]) -> list[int]:
        """Commit tokens up to max_new_tokens or an end-of-sequence token; return those kept."""
        kept = []
        for t in new:
            if self.remaining <= 0:
                break
            kept.append(t)
            self.output.append(t)
            if t in self.cfg.eos_token_ids:
                self.finish_reason = "stop"
                break
        if self.finish_reason is None and self.remaining <= 0:
            self.finish_reason = "length"
        return kept
