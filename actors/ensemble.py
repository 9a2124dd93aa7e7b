"""Ensemble decode loops: standard collaborative decoding, and CoS. Written once against a
small member interface, so the same loop runs on in-process ModelRunners (`LocalMember`)
and on Ray actors over ZeroMQ (`actors.ensemble_peers.RemoteMember`).

A member is one model with its KV cache that scores or drafts for a context
(`actors.ensemble_member`: the interface, and what a model does to answer).

`ensemble_generate` (the baseline): per token, every member scores the newest token (in
parallel when they are actors), the rows combine (`decoding.ensemble.combine_logits`) and
the token is drawn from r, the combined logits under the SamplingParams.

`cos_generate` (CoS, arXiv 2502.01662), per round:
1. the proposer (by default `CosOptions.default_proposer`) puts forward K tokens: a bonus
   it carried over from the previous round, if any, then drafts from its own q;
2. every other member scores the context plus the K proposals in one forward, in parallel;
3. with the rows of all n members at each proposed position, r is known there: proposal x
   passes with probability min(1, r(x)/q(x)); the first failure samples the correction from
   norm(max(0, r - q)) and the next round goes back to the default proposer;
4. if all K pass, nobody has r at the next position (the proposer never fed its last
   draft), but every verifier has its own row there. Alternate proposal: the next verifier
   in turn (the default proposer when it was verifying) draws a token from its own q
   there; that token is not committed, it becomes the first proposal of the next round,
   with that member as proposer, and is tested like any draft. Roles rotate so.

Why the output follows r exactly (and is token-identical to the baseline at T = 0).
Take any position t with committed prefix c. Whatever happened before, the token emitted
at t is produced by one of: (a) a baseline step, a draw from r(. | c); or (b) a rejection
test of a proposal x ~ q(. | c), where q is some member's own distribution given exactly c
(a draft, or a carried bonus: both are drawn from that member's row for c), the coin that
drew x is independent of the leader's acceptance coin, and the test is min(1, r/q) with
residual norm(max(0, r - q)). In (b), P(emit y) = q(y) min(1, r(y)/q(y)) + (1 - sum_z
min(q(z), r(z))) * (r(y) - min(q(y), r(y))) / (1 - sum_z min(q(z), r(z))) = r(y) (Leviathan
et al.). Which member proposes, how many tokens it drafts and whether a step is (a) or (b)
depend only on what happened before t (earlier outcomes, measured costs), never on the
coins at t, so conditional on c the token is r(. | c)-distributed, and by the chain rule
the sequence follows r. This holds for any n: the "other" models only supply their rows
to build r, and the proposer may be any of them. Dropping the carried bonus (role swap
off) is a case of "the next position is decided by a later round": still exact. At T = 0,
r and q are one-hot; a proposal passes iff it is argmax r and the correction is argmax r,
so every emitted token is argmax r(. | c): the baseline's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from actors.ensemble_member import Member, Rows
from actors.pipeline_options import Cancelled
from decoding.draft_length import CostModel
from decoding.ensemble import CombineRule, choose_gamma, combine_logits, cos_verify
from decoding.request import (
    DecodeConfig,
    GenerationResult,
    GenerationStats,
    OutputBuffer,
    TokenSink,
    make_generator,
    next_token,
)
from decoding.sampling import logits_to_probs


def _gather(members: Sequence[Member], jobs: dict[int, tuple[str, list[int], int]]) -> dict[int, Rows]:
    """Run jobs {member index: (kind, context, count)} in parallel; remote ones first."""
    for i, (kind, context, count) in jobs.items():
        if not members[i].local:
            members[i].submit(kind, context, count)
    for i, (kind, context, count) in jobs.items():
        if members[i].local:
            members[i].submit(kind, context, count)
    order = sorted(jobs, key=lambda i: not members[i].local)  # local compute overlaps remote
    return {i: members[i].result() for i in order}


def _begin(members: Sequence[Member], prompt: list[int], cfg: DecodeConfig) -> None:
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    room = cfg.cache_room(len(prompt))
    for m in members:
        m.begin(room, cfg.sampling, cfg.seed)


def _combined_step(members, rule, context, cfg, gen) -> int:
    """Every member scores the newest token; one token from r."""
    rows = _gather(members, {i: ("score", context, 1) for i in range(len(members))})
    combined = combine_logits([rows[i].logits[0] for i in range(len(members))], rule)
    return next_token(combined, cfg.sampling, gen)


def _check_cancelled(cancelled: Callable[[], bool] | None) -> None:
    if cancelled is not None and cancelled():
        raise Cancelled("request cancelled")


def ensemble_generate(members: Sequence[Member], rule: CombineRule, prompt: list[int], cfg: DecodeConfig,
                      on_tokens: TokenSink | None = None,
                      cancelled: Callable[[], bool] | None = None) -> GenerationResult:
    """Standard collaborative decoding: every member at every token."""
    stats, out, gen = GenerationStats(), OutputBuffer(cfg, on_tokens), make_generator(cfg.seed)
    start = time.perf_counter()
    _begin(members, prompt, cfg)
    while not out.done:
        _check_cancelled(cancelled)
        out.extend([_combined_step(members, rule, prompt + out.tokens, cfg, gen)])
        stats.target_forwards += 1
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)


@dataclass(frozen=True)
class CosOptions:
    default_proposer: int = 0  # the member that drafts unless a bonus swapped roles
    swap_draft_length: int = 1  # proposals from a swapped-in proposer, its carried bonus included
    role_swap: bool = True  # alternate proposal; off: an all-accepted round's bonus is dropped
    fallback: bool = True  # adaptive gamma only: baseline steps while speculation does not pay
    probe_every: int = 16  # fallback: after this many baseline steps, try one CoS round again

    def __post_init__(self) -> None:
        if self.default_proposer < 0:
            raise ValueError(f"default_proposer must be >= 0, got {self.default_proposer}")
        if self.swap_draft_length < 1:
            raise ValueError(f"swap_draft_length must be >= 1, got {self.swap_draft_length}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")


@dataclass
class CosState:
    """What CoS learns about one ensemble, carried across requests: measured costs (the
    default proposer's draft step, the verifiers' parallel scoring of n tokens, one baseline
    step) and the acceptance rate."""

    costs: CostModel = field(default_factory=CostModel)
    baseline_s: float | None = None
    passed: float = 0.6  # decayed counts: acceptance = passed / tested
    tested: float = 1.0
    baseline_streak: int = 0  # baseline steps since the last CoS round (across requests)
    round_streak: int = 0  # CoS rounds since the last baseline step (across requests)
    round_rate: float | None = None  # tokens/s CoS rounds really delivered, all costs included
    # what the fallback's step and round times are read from (a test drives its own clock, so
    # that the mode chosen does not hang on how loaded the box is)
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False, compare=False)

    @property
    def acceptance(self) -> float:
        return self.passed / self.tested

    def observe_round(self, accepted: int, tested: int) -> None:
        self.passed, self.tested = 0.8 * self.passed + accepted, 0.8 * self.tested + tested

    def observe_baseline(self, seconds: float) -> None:
        self.baseline_s = seconds if self.baseline_s is None else 0.7 * self.baseline_s + 0.3 * seconds

    def observe_rate(self, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-9)
        self.round_rate = rate if self.round_rate is None else 0.7 * self.round_rate + 0.3 * rate

    def prefers_baseline(self, probe_every: int, rounds_done: int) -> bool:
        """Fallback: take a baseline step now? Whichever mode measured faster wins, and the
        loser is measured again every `probe_every` steps, so that one stale measurement (a
        step slowed by another process) cannot lock the loop into either mode."""
        if self.baseline_s is None:
            return rounds_done > 0  # one baseline step after the first round measures it
        if self.round_rate is not None and self.round_rate * self.baseline_s < 1:
            return self.baseline_streak < probe_every
        return self.round_streak >= probe_every

    def plan(self, max_len: int) -> tuple[int, float | None]:
        """(draft length, expected tokens/s) from the measurements; (3, None) before any."""
        if self.costs.draft_step_s is None or not self.costs.verify_s:
            return min(3, max_len), None
        return choose_gamma(self.acceptance, self.costs.draft_step_s, self.costs.verify, max_len)


def _next_proposer(verifiers: list[int], default: int, proposer: int, n: int) -> int:
    if default in verifiers:
        return default
    return next((proposer + j) % n for j in range(1, n) if (proposer + j) % n in verifiers)


def cos_generate(members: Sequence[Member], rule: CombineRule, prompt: list[int], cfg: DecodeConfig,
                 opts: CosOptions | None = None, on_tokens: TokenSink | None = None, state: CosState | None = None,
                 cancelled: Callable[[], bool] | None = None) -> GenerationResult:
    """CoS: lossless speculation over an ensemble (see the module doc). `cfg.draft_length`
    fixes the default proposer's draft length (no fallback then); else it adapts."""
    opts, state = opts or CosOptions(), state if state is not None else CosState()
    n = len(members)
    if not 0 <= opts.default_proposer < n:
        raise ValueError(f"default_proposer {opts.default_proposer} is not one of the {n} members")
    stats, out, gen = GenerationStats(), OutputBuffer(cfg, on_tokens), make_generator(cfg.seed)
    params, start = cfg.sampling, time.perf_counter()
    _begin(members, prompt, cfg)
    out.extend([_combined_step(members, rule, prompt, cfg, gen)])  # the prefill: all members
    stats.target_forwards = 1
    default = proposer = opts.default_proposer
    carry: tuple[int, torch.Tensor] | None = None  # (bonus token, the proposer's row it came from)
    adaptive = cfg.draft_length is None
    while not out.done:
        _check_cancelled(cancelled)
        context = prompt + out.tokens
        if proposer == default:
            k = min(cfg.draft_length, cfg.max_draft_length) if not adaptive else state.plan(cfg.max_draft_length)[0]
        else:
            k = min(opts.swap_draft_length, cfg.max_draft_length)
        # Baseline steps while they beat the rate CoS rounds really delivered (both measured
        # end to end, transport included: a cost model misses what overlaps and what does
        # not, e.g. members that score in parallel in a baseline step but take turns in
        # CoS).
        fallback = carry is None and adaptive and opts.fallback
        if fallback and state.prefers_baseline(opts.probe_every, stats.verify_rounds):
            step_start = state.clock()
            out.extend([_combined_step(members, rule, context, cfg, gen)])
            state.observe_baseline(state.clock() - step_start)
            stats.target_forwards += 1
            state.baseline_streak, state.round_streak = state.baseline_streak + 1, 0
            continue
        state.baseline_streak, state.round_streak = 0, state.round_streak + 1
        round_start = state.clock()
        k = max(1, min(k, out.remaining))
        # 1. proposals
        tokens, rows = ([carry[0]], [carry[1]]) if carry is not None else ([], [])
        if k > len(tokens):
            drafted = _gather(members, {proposer: ("draft", context + tokens, k - len(tokens))})[proposer]
            tokens += drafted.tokens
            rows += list(drafted.logits)
            stats.draft_s += drafted.seconds
            if proposer == default:
                state.costs.observe_draft(drafted.seconds, len(drafted.tokens))
        # 2. the others score them, in parallel
        verifiers = [i for i in range(n) if i != proposer]
        verify_start = time.perf_counter()
        scored = _gather(members, {i: ("score", context + tokens, len(tokens) + 1) for i in verifiers})
        verify_s = time.perf_counter() - verify_start
        if proposer == default:
            state.costs.observe_verify(verify_s, len(tokens) + 1)
        # 3. test them against r
        k = len(tokens)
        own = torch.stack(rows)
        member_rows = [own if i == proposer else scored[i].logits[:k] for i in range(n)]
        r = logits_to_probs(combine_logits(member_rows, rule), params)
        q = logits_to_probs(own, params)
        accepted, correction = cos_verify(tokens, q, r, params.greedy, gen)
        state.observe_round(accepted, accepted + (correction is not None))
        stats.verify_rounds += 1
        stats.target_forwards += 1
        stats.drafted_tokens += k
        stats.accepted_tokens += accepted
        stats.verify_s += verify_s
        if correction is not None:
            new, proposer, carry = tokens[:accepted] + [correction], default, None
        else:
            new, carry = tokens, None
            proposer_was = proposer
            proposer = default
            if opts.role_swap and len(out.tokens) + k < cfg.max_new_tokens:
                # 4. alternate proposal: a verifier's own token at the next position
                proposer = _next_proposer(verifiers, default, proposer_was, n)
                row = scored[proposer].logits[k]
                carry = (next_token(row, params, gen), row)
        out.extend(new)
        state.observe_rate(len(new), state.clock() - round_start)
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)
