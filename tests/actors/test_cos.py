"""The ensemble loops in process, on tiny models: CoS is token-identical to standard
collaborative decoding at T = 0, and follows the combined distribution r at T > 0 (exact
r enumerated from the models; chi-squared over whole sequences, 10,000 samples)."""

from __future__ import annotations

import pytest
import torch

import decoding.acceptance as acceptance
from actors import loading
from actors.ensemble import CosOptions, CosState, cos_generate, ensemble_generate
from actors.ensemble_member import local_members
from actors.model import Transformer
from actors.runner import ModelRunner
from decoding.ensemble import parse_combine
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams

from sampling_check import MODEL, NEW, PROMPT, SAMPLES, chi2_pvalue, exact_combined_probs


def load_runner(path: str, max_len: int = 256) -> ModelRunner:
    return ModelRunner(Transformer.from_hf(loading.load(path, progress=False).hf_model), max_len)


@pytest.fixture(scope="module")
def trio(tiny_dir):
    """Three members sharing a vocabulary: a model, a noisy copy, and an unrelated one."""
    return [load_runner(tiny_dir("qwen2")), load_runner(tiny_dir("qwen2", noise=0.3)),
            load_runner(tiny_dir("llama", seed=3))]


GREEDY_CASES = [(2, "we:0.5"), (2, "we:0.8"), (2, "cd:0.3"), (3, "we:1,2,1")]


@pytest.mark.parametrize("n, combine", GREEDY_CASES)
def test_greedy_cos_is_token_identical_to_the_baseline(trio, n, combine):
    members = local_members(trio[:n])
    rule = parse_combine(combine, n)
    gen = torch.Generator().manual_seed(4)
    state = CosState()
    for trial in range(3):
        prompt = torch.randint(2, 64, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen).tolist()
        cfg = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
        expected = ensemble_generate(members, rule, prompt, cfg).token_ids
        assert len(expected) == 40
        for draft_length in (None, 1, 4):
            for proposer in range(n):
                for swap in (True, False):
                    opts = CosOptions(default_proposer=proposer, role_swap=swap)
                    got = cos_generate(members, rule, prompt, DecodeConfig(
                        max_new_tokens=40, eos_token_ids=(-1,), draft_length=draft_length), opts, state=state)
                    assert got.token_ids == expected, (trial, draft_length, proposer, swap)
                    assert got.stats.new_tokens == 40


def test_cos_saves_ensemble_passes_when_members_agree(trio):
    same = local_members([trio[0], load_runner_from(trio[0])])
    rule = parse_combine("we:0.5", 2)
    cfg = DecodeConfig(max_new_tokens=48, eos_token_ids=(-1,), draft_length=6)
    base = ensemble_generate(same, rule, [5, 6], cfg)
    cos = cos_generate(same, rule, [5, 6], cfg, CosOptions(fallback=False))
    assert cos.token_ids == base.token_ids
    assert cos.stats.accepted_tokens == cos.stats.drafted_tokens  # identical members: all pass
    assert cos.stats.target_forwards < base.stats.target_forwards / 2


def load_runner_from(runner: ModelRunner) -> ModelRunner:
    return ModelRunner(runner.model, 256)  # same weights, own cache


def test_streaming_and_stop_tokens(trio):
    members = local_members(trio[:2])
    rule = parse_combine("we:0.5", 2)
    full = ensemble_generate(members, rule, [7, 8], DecodeConfig(max_new_tokens=30, eos_token_ids=(-1,))).token_ids
    stop = full[10]
    seen: list[int] = []
    cfg = DecodeConfig(max_new_tokens=30, eos_token_ids=(stop,), draft_length=3)
    got = cos_generate(members, rule, [7, 8], cfg, on_tokens=seen.extend)
    assert got.token_ids == full[: full.index(stop) + 1] == seen


class StepClock:
    """A clock that moves 1 ms per reading plus whatever a member's work is declared to cost:
    the fallback's choice then depends on the costs the test sets, not on the box's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1e-3
        return self.now


class SlowDrafts:
    """A member whose every draft call costs `delay` seconds more on `clock`."""

    def __init__(self, inner, delay: float, clock: StepClock):
        self.inner, self.delay, self.clock, self.name, self.local = inner, delay, clock, inner.name, inner.local

    def begin(self, *args) -> None:
        self.inner.begin(*args)

    def submit(self, kind: str, context: list[int], count: int) -> None:
        if kind == "draft":
            self.clock.now += self.delay
        self.inner.submit(kind, context, count)

    def result(self):
        return self.inner.result()


def test_adaptive_cos_falls_back_when_speculation_does_not_pay(trio):
    """With drafting made slow, CoS rounds deliver fewer tokens/s than baseline steps: the
    loop measures both and takes baseline steps, probing now and then; same output."""
    fast = local_members(trio[:2])
    clock = StepClock()
    # a round costs a draft (0.15 s) and delivers at most a few tokens; a baseline step
    # costs two clock readings and delivers one
    members = [SlowDrafts(fast[0], 0.15, clock), fast[1]]
    rule = parse_combine("we:0.5", 2)
    cfg = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
    state = CosState(clock=clock)
    got = cos_generate(members, rule, [3, 4], cfg, CosOptions(default_proposer=0, probe_every=16), state=state)
    assert got.token_ids == ensemble_generate(fast, rule, [3, 4], cfg).token_ids
    assert got.stats.verify_rounds <= 6  # the first round and probes (and the carried bonus they may leave)


def test_fallback_measures_the_losing_mode_again():
    """One stale measurement must not lock the loop into a mode: after `probe_every` steps
    of the winner, one step of the loser is taken to measure it again."""
    state = CosState()
    assert not state.prefers_baseline(4, rounds_done=0)  # the first step is a CoS round
    assert state.prefers_baseline(4, rounds_done=1)  # then one baseline step measures it
    state.observe_rate(2, 0.1)  # rounds: 20 tokens/s
    state.observe_baseline(0.2)  # a baseline step that looked slow (5 tokens/s): CoS wins
    assert not state.prefers_baseline(4, rounds_done=1)
    state.round_streak = 4
    assert state.prefers_baseline(4, rounds_done=5)  # ... until it is time to measure again
    state.observe_baseline(0.001)
    state.observe_baseline(0.001)
    state.observe_baseline(0.001)
    state.observe_baseline(0.001)  # baseline now wins (about 50 ms a step, decayed)
    state.round_streak = 0
    assert state.prefers_baseline(4, rounds_done=5)
    state.baseline_streak = 4
    assert not state.prefers_baseline(4, rounds_done=5)  # a probe round


# ---- sampling: the exact combined distribution -------------------------------------------

@pytest.fixture(scope="module")
def vocab4(tiny_dir):
    def runner(**kw):
        return load_runner(tiny_dir("qwen2", **MODEL, **kw), 64)

    return [runner(), runner(noise=0.3), runner(seed=9)]


def sample_cos(runners, rule, params, opts, draft_length, n=SAMPLES):
    members = local_members(runners)
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(5)).tolist()
    out = []
    for seed in seeds:
        cfg = DecodeConfig(max_new_tokens=NEW, sampling=params, seed=seed, draft_length=draft_length,
                           eos_token_ids=(-1,))
        result = cos_generate(members, rule, PROMPT, cfg, opts)
        out.append(tuple(result.token_ids))
    return out


SAMPLING_CASES = [
    # n models, combine, role swap, default proposer, draft length
    (2, "we:0.5", True, 1, 2),
    (2, "cd:0.5", False, 0, 3),
    (3, "we:1,1,2", True, 2, 2),
    (3, "we:2,1,1", False, 0, 2),
]


@pytest.mark.parametrize("n, combine, swap, proposer, draft_length", SAMPLING_CASES)
def test_sampling_follows_the_combined_distribution(vocab4, n, combine, swap, proposer, draft_length):
    runners, rule = vocab4[:n], parse_combine(combine, n)
    params = SamplingParams(temperature=1.0)
    probs = exact_combined_probs(runners, rule, params)
    opts = CosOptions(default_proposer=proposer, role_swap=swap, fallback=False)
    samples = sample_cos(runners, rule, params, opts, draft_length)
    assert chi2_pvalue(samples, probs) > 1e-3


def test_broken_residual_is_caught(vocab4, monkeypatch):
    """Power check: sampling the correction from r instead of norm(max(0, r - q)) fails."""
    runners, rule = vocab4[:2], parse_combine("we:0.5", 2)
    params = SamplingParams(temperature=1.0)
    probs = exact_combined_probs(runners, rule, params)
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p / p.sum(-1, keepdim=True))
    samples = sample_cos(runners, rule, params, CosOptions(fallback=False), 2, n=2500)
    assert chi2_pvalue(samples, probs) < 1e-6
