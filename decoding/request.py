"""What a generation request asks for, what it produced, and when it is done.

Shared by every pipeline (local, and the verifier side of the Ray pipelines), so it
lives here rather than in `cluster/`: actors import it without importing the driver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from decoding.sampling import SamplingParams, logits_to_probs, sample


@dataclass
class DecodeConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    draft_length: int | None = None  # None: adaptive
    max_draft_length: int = 12
    tree_width: int = 1  # 1 = chain; k > 1 adds k - 1 sibling leaves per depth
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.draft_length is not None and self.draft_length < 1:
            raise ValueError(f"draft_length must be >= 1, got {self.draft_length}")
        if self.tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {self.tree_width}")
        self.eos_token_ids = tuple(self.eos_token_ids)

    def cache_room(self, prompt_len: int, lookahead: int = 0) -> int:
        """KV slots a request can need: prompt, output, and the widest tree in flight."""
        return prompt_len + self.max_new_tokens + (max(self.max_draft_length, lookahead) + 1) * self.tree_width + 1

    def to_dict(self) -> dict:
        """Plain data (for Ray calls): no custom classes cross a process boundary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecodeConfig":
        return cls(**{**data, "sampling": SamplingParams(**data["sampling"])})


@dataclass
class GenerationStats:
    new_tokens: int = 0
    target_forwards: int = 0
    verify_rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0  # time the drafter spent drafting
    verify_s: float = 0.0  # time the target spent verifying
    wait_s: float = 0.0  # time the verifier sat waiting for drafts (Ray pipelines)
    rollbacks: int = 0  # async: times the drafter threw its speculation away
    drafter_lost: bool = False  # the drafter died or went silent; the rest was target-only
    tree_build_s: float = 0.0  # draft heads: time spent choosing trees (inside draft_s)
    # ssd: rounds answered from a draft made while the target verified (by the outcome's
    # rank among those pre-drafted), rounds drafted afresh, tokens pre-drafted and never sent
    predraft_hits: int = 0
    predraft_hit_ranks: list = field(default_factory=list)
    predraft_misses: int = 0
    predrafted_tokens: int = 0
    predraft_wasted: int = 0
    # How the models attended (`attention`, `approximate`, `draft_attention`): set by the engine
    labels: dict = field(default_factory=dict)

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target verify forward (accepted drafts + the target's own)."""
        if self.verify_rounds == 0:
            return 1.0
        return (self.accepted_tokens + self.verify_rounds) / self.verify_rounds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def hidden_draft_fraction(self) -> float:
        """Share of drafting the verifier never waited for (0 when draft, then verify)."""
        if self.draft_s <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.wait_s / self.draft_s))

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "mean_accepted": round(self.mean_accepted, 4),
            "tokens_per_s": round(self.tokens_per_s, 4),
            "wall_s": round(self.wall_s, 4),
            "mean_drafted": round(self.drafted_tokens / self.verify_rounds, 4) if self.verify_rounds else 0.0,
            # draft heads: ms per step choosing the tree (static trees only gather tokens)
            **({"tree_build_ms": round(1e3 * self.tree_build_s / self.verify_rounds, 4)}
               if self.tree_build_s and self.verify_rounds else {}),
            **self.labels,
        }

    def to_dict(self) -> dict:
        """Every field, for passing stats between processes."""
        return asdict(self)


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats


TokenSink = Callable[[list[int]], "bool | None"]


class OutputBuffer:
    """Collects generated tokens; knows when to stop (length or end-of-sequence).

    `on_tokens` sees each batch of newly committed tokens as it lands (streaming). It
    returns True to end the request here (a stop string was seen), or raises (the client
    went away) to abandon it.
    """

    def __init__(self, cfg: DecodeConfig, on_tokens: TokenSink | None = None):
        self.cfg, self.tokens, self.done, self.on_tokens = cfg, [], False, on_tokens

    def extend(self, new: list[int]) -> None:
        start = len(self.tokens)
        for t in new:
            if self.done:
                break
            self.tokens.append(t)
            self.done = len(self.tokens) >= self.cfg.max_new_tokens or t in self.cfg.eos_token_ids
        if self.on_tokens is not None and len(self.tokens) > start:
            if self.on_tokens(self.tokens[start:]) is True:
                self.done = True

    @property
    def remaining(self) -> int:
        return self.cfg.max_new_tokens - len(self.tokens)


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


def next_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """The target's own choice after `logits`: argmax, or a draw from its distribution."""
    if params.greedy:
        return int(logits.argmax())
    return int(sample(logits_to_probs(logits, params), gen))
