"""One request in the batch, and the pool of KV-cache slots the requests take turns on."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from actors.model import Transformer
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
    token but the newest (`tokens[-1]`, the root of the next round); the draft cache holds
    `draft_tokens`, a prefix of the committed tokens it has fed so far."""

    id: str
    prompt: list[int]
    cfg: DecodeConfig
    speculative: bool
    logprobs: int | None  # None: no logprobs; k >= 0: the chosen token's and the top k
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the target cache
    slot: int | None = None
    target_cache: KVCache | None = None
    draft_cache: KVCache | None = None
    draft_tokens: list[int] = field(default_factory=list)
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


class SlotPool:
    """Fixed KV-cache slots, one per running sequence, each `max_len` long, per model.

    Every slot's caches are allocated (and their pages touched) when the engine starts, so
    the first burst of requests does not pay for gigabytes of page faults; then they are
    reused: a sequence growing, committing a path or leaving never copies or reallocates."""

    def __init__(self, models: list[Transformer], slots: int, max_len: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.models, self.max_len = models, max_len
        self.caches = [[m.new_cache(max_len) for m in models] for _ in range(slots)]
        self.free = list(range(slots))[::-1]

    def take(self) -> tuple[int, list[KVCache]]:
        slot = self.free.pop()
        for cache in self.caches[slot]:
            cache.reset()
        return slot, self.caches[slot]

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def available(self) -> int:
        return len(self.free)
