"""The local pipeline: draft and target in one process. This is the whole decode loop.

Per round: the draft proposes a small token tree rooted at the newest committed token
(`ModelRunner.propose`), the target scores every node in one forward
(`ModelRunner.score_tree`), an acceptance rule picks the path the target agrees with and
the token that follows it (`decoding.acceptance`), and both sides commit that path
(`commit_path` on the target; the draft rolls back lazily on its next `sync`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.runner import ModelRunner
from decoding.acceptance import verify_greedy, verify_sampling
from decoding.draft_length import DraftLengthPolicy
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


@dataclass
class GenerationStats:
    new_tokens: int = 0
    target_forwards: int = 0
    verify_rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target verify forward (accepted drafts + the target's own)."""
        if self.verify_rounds == 0:
            return 1.0
        return (self.accepted_tokens + self.verify_rounds) / self.verify_rounds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "mean_accepted": round(self.mean_accepted, 4),
            "tokens_per_s": round(self.tokens_per_s, 4),
            "wall_s": round(self.wall_s, 4),
        }


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats


class _Output:
    """Collects generated tokens; knows when to stop (length or end-of-sequence)."""

    def __init__(self, cfg: DecodeConfig):
        self.cfg, self.tokens, self.done = cfg, [], False

    def extend(self, new: list[int]) -> None:
        for t in new:
            if self.done:
                return
            self.tokens.append(t)
            self.done = len(self.tokens) >= self.cfg.max_new_tokens or t in self.cfg.eos_token_ids

    @property
    def remaining(self) -> int:
        return self.cfg.max_new_tokens - len(self.tokens)


def _first_token(target: ModelRunner, prompt: list[int], cfg: DecodeConfig, gen) -> int:
    logits = target.feed(prompt)
    if cfg.sampling.greedy:
        return int(logits.argmax())
    return int(sample(logits_to_probs(logits, cfg.sampling), gen))


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


def autoregressive_generate(target: ModelRunner, prompt: list[int], cfg: DecodeConfig) -> GenerationResult:
    """The target alone, one token per forward: the baseline speculation must match."""
    stats, out, gen = GenerationStats(), _Output(cfg), _generator(cfg.seed)
    start = time.perf_counter()
    target.reset(len(prompt) + cfg.max_new_tokens + 1)
    out.extend([_first_token(target, prompt, cfg, gen)])
    stats.target_forwards = 1
    while not out.done:
        logits = target.feed(out.tokens[-1:])
        stats.target_forwards += 1
        nxt = int(logits.argmax()) if cfg.sampling.greedy else int(sample(logits_to_probs(logits, cfg.sampling), gen))
        out.extend([nxt])
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)


def speculative_generate(
    target: ModelRunner,
    draft: ModelRunner,
    prompt: list[int],
    cfg: DecodeConfig,
    policy: DraftLengthPolicy | None = None,
) -> GenerationResult:
    """Lossless speculative decoding: the output follows the target's own distribution
    (token-identical under greedy) whatever the draft proposes."""
    policy = policy or DraftLengthPolicy(
        max_len=cfg.max_draft_length, fixed=cfg.draft_length, tokens_per_node=cfg.tree_width
    )
    stats, out, gen = GenerationStats(), _Output(cfg), _generator(cfg.seed)
    start = time.perf_counter()
    room = len(prompt) + cfg.max_new_tokens + (cfg.max_draft_length + 1) * cfg.tree_width + 1
    target.reset(room)
    draft.reset(room)
    out.extend([_first_token(target, prompt, cfg, gen)])
    stats.target_forwards = 1
    while not out.done:
        context = prompt + out.tokens
        # Never draft past the requested length: those tokens would be thrown away.
        proposal = draft.propose(
            context, cfg.sampling, policy, max_depth=max(1, out.remaining - 1), width=cfg.tree_width, generator=gen
        )
        verify_start = time.perf_counter()
        logits = target.score_tree(context, proposal.tree)
        if cfg.sampling.greedy:
            verdict = verify_greedy(proposal.tree, logits)
        else:
            verdict = verify_sampling(
                proposal.tree, logits_to_probs(logits, cfg.sampling), proposal.draft_probs, gen
            )
        target.commit_path(proposal.tree, verdict.accepted)
        verify_s = time.perf_counter() - verify_start
        policy.costs.observe_draft(proposal.seconds, proposal.depth)
        policy.costs.observe_verify(verify_s, proposal.tree.size)
        policy.observe_acceptance(len(verdict.accepted), proposal.predicted)
        out.extend(proposal.tree.tokens[verdict.accepted].tolist() + [verdict.next_token])
        stats.target_forwards += 1
        stats.verify_rounds += 1
        stats.drafted_tokens += proposal.depth
        stats.accepted_tokens += len(verdict.accepted)
        stats.draft_s += proposal.seconds
        stats.verify_s += verify_s
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)
