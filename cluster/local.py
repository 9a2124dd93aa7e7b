"""The local pipeline: draft and target in one process. This is the whole decode loop.

Per round: the draft proposes a small token tree rooted at the newest committed token
(`ModelRunner.propose`), the target scores every node in one forward
(`ModelRunner.score_tree`), an acceptance rule picks the path the target agrees with and
the token that follows it (`decoding.acceptance`), and both sides commit that path
(`commit_path` on the target; the draft rolls back lazily on its next `sync`).
"""

from __future__ import annotations

import time

from actors.head_drafter import HeadDrafter
from actors.runner import ModelRunner
from actors.tidal import TidalConfig
from decoding.acceptance import verify_greedy, verify_sampling, verify_sampling_point_mass
from decoding.draft_length import DraftLengthPolicy
from decoding.request import (  # noqa: F401  (DecodeConfig etc. are imported from here too)
    DecodeConfig,
    GenerationResult,
    GenerationStats,
    OutputBuffer,
    TokenSink,
    make_generator,
    next_token,
)
from decoding.sampling import logits_to_probs


def _first_token(target: ModelRunner, prompt: list[int], cfg: DecodeConfig, gen, room: int) -> int:
    """Prefill (chunked; skipped when the runner holds this prompt's snapshot) and sample."""
    return next_token(target.start(prompt, room)[1], cfg.sampling, gen)


def autoregressive_generate(
    target: ModelRunner, prompt: list[int], cfg: DecodeConfig, on_tokens: TokenSink | None = None
) -> GenerationResult:
    """The target alone, one token per forward: the baseline speculation must match."""
    stats, out, gen = GenerationStats(), OutputBuffer(cfg, on_tokens), make_generator(cfg.seed)
    start = time.perf_counter()
    out.extend([_first_token(target, prompt, cfg, gen, len(prompt) + cfg.max_new_tokens + 1)])
    stats.target_forwards = 1
    while not out.done:
        logits = target.feed(out.tokens[-1:])
        stats.target_forwards += 1
        out.extend([next_token(logits, cfg.sampling, gen)])
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)


def speculative_generate(
    target: ModelRunner,
    draft: ModelRunner,
    prompt: list[int],
    cfg: DecodeConfig,
    policy: DraftLengthPolicy | None = None,
    on_tokens: TokenSink | None = None,
    self_draft: TidalConfig | None = None,
) -> GenerationResult:
    """Lossless speculative decoding: the output follows the target's own distribution
    (token-identical under greedy) whatever the draft proposes.

    `self_draft`: no draft model (`draft is target`); the target drafts for itself with
    this sparse attention over its own cache, and verifies with full attention."""
    if (self_draft is not None) != (draft is target):
        raise ValueError("the target drafts for itself only with a sparse self_draft attention")
    if target.approximate and self_draft is not None:
        raise ValueError("self-drafting needs a target that verifies with full attention")
    policy = policy or DraftLengthPolicy(
        max_len=cfg.max_draft_length, fixed=cfg.draft_length, tokens_per_node=cfg.tree_width
    )
    stats, out, gen = GenerationStats(), OutputBuffer(cfg, on_tokens), make_generator(cfg.seed)
    start = time.perf_counter()
    room = cfg.cache_room(len(prompt))
    out.extend([_first_token(target, prompt, cfg, gen, room)])
    if draft is not target:
        draft.start(prompt, room)
    stats.target_forwards = 1
    while not out.done:
        context = prompt + out.tokens
        # Never draft past the requested length: those tokens would be thrown away.
        proposal = draft.propose(
            context, cfg.sampling, policy, max_depth=max(1, out.remaining - 1), width=cfg.tree_width, generator=gen,
            self_draft=self_draft,
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


def heads_generate(
    target: ModelRunner, drafter: HeadDrafter, prompt: list[int], cfg: DecodeConfig,
    on_tokens: TokenSink | None = None,
) -> GenerationResult:
    """Speculation with draft heads: the hidden state of the last committed token gives the
    next tree, and verifying a tree gives the hidden states for the round after, so each
    round is one target forward. Candidates are the heads' top-k (point-mass proposals),
    so sampling verifies with `verify_sampling_point_mass`; the output is the target's."""
    stats, out, gen = GenerationStats(), OutputBuffer(cfg, on_tokens), make_generator(cfg.seed)
    start = time.perf_counter()
    hidden, logits = target.start(prompt, cfg.cache_room(len(prompt)) + drafter.max_nodes)
    out.extend([next_token(logits, cfg.sampling, gen)])
    stats.target_forwards = 1
    while not out.done:
        context = prompt + out.tokens
        proposal = drafter.propose(hidden, context[-1], max_depth=out.remaining - 1)
        verify_start = time.perf_counter()
        states = target.score_tree_hidden(context, proposal.tree)
        logits = target.model.logits(states)
        if cfg.sampling.greedy:
            verdict = verify_greedy(proposal.tree, logits)
        else:
            verdict = verify_sampling_point_mass(proposal.tree, logits_to_probs(logits, cfg.sampling), gen)
        target.commit_path(proposal.tree, verdict.accepted)
        drafter.observe(proposal, len(verdict.accepted))
        hidden = states[verdict.last_node]
        out.extend(proposal.tree.tokens[verdict.accepted].tolist() + [verdict.next_token])
        stats.target_forwards += 1
        stats.verify_rounds += 1
        stats.drafted_tokens += proposal.tree.size - 1
        stats.accepted_tokens += len(verdict.accepted)
        stats.draft_s += proposal.seconds
        stats.tree_build_s += proposal.build_s
        stats.verify_s += time.perf_counter() - verify_start
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)
