"""The sync and async pipelines over real ZeroMQ sockets, drafter and verifier in two
threads of this process (the Ray tests put them in separate actors): greedy output is the
target's own, sampled output follows the target's distribution."""

from __future__ import annotations

import time

import pytest
import torch

import decoding.acceptance as acceptance
from actors import loading
from actors.model import Transformer
from actors.pipeline_options import PipelineOptions
from actors.proposing import propose_request
from actors.runner import ModelRunner
from actors.ssd import likely_outcomes
from cluster.local import autoregressive_generate
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams
from protocol import CandidateTree

from sampling_check import NEW, PROMPT, SAMPLES, caught_pvalue, chi2_pvalue, exact_sequence_probs, runners, seeds
from wire_pair import FINGERPRINT, WirePair


def drafting_pair(target: ModelRunner, draft: ModelRunner) -> WirePair:
    """The target verifying here, `draft` drafting in another thread."""
    def propose(dealer, session, cfg, opts, cancelled):
        return propose_request(draft, dealer, FINGERPRINT, session, cfg, opts, cancelled=cancelled)

    return WirePair(target, propose)


def tiny_runner(path: str, max_len: int = 256) -> ModelRunner:
    return ModelRunner(Transformer.from_hf(loading.load(path, progress=False).hf_model), max_len)


OPTIONS = [
    ("sync", PipelineOptions(mode="sync"), {}),
    ("sync-fixed3", PipelineOptions(mode="sync"), {"draft_length": 3}),
    ("sync-tree3", PipelineOptions(mode="sync"), {"tree_width": 3}),
    ("async-1", PipelineOptions(mode="async", lookahead=1), {}),
    ("async-3", PipelineOptions(mode="async", lookahead=3), {}),
    ("async-8", PipelineOptions(mode="async", lookahead=8), {}),
    ("ssd", PipelineOptions(mode="ssd"), {}),
    ("ssd-fixed3", PipelineOptions(mode="ssd"), {"draft_length": 3}),
]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_output_is_the_targets_own(tiny_dir, family):
    pair = drafting_pair(tiny_runner(tiny_dir(family)), tiny_runner(tiny_dir(family, noise=0.3)))
    gen = torch.Generator().manual_seed(3)
    for trial in range(4):
        prompt = torch.randint(2, 64, (int(torch.randint(1, 20, (), generator=gen)),), generator=gen).tolist()
        expected = autoregressive_generate(pair.target, prompt, DecodeConfig(max_new_tokens=40)).token_ids
        for name, opts, extra in OPTIONS:
            result, box = pair.generate(prompt, DecodeConfig(max_new_tokens=40, **extra), opts)
            assert "error" not in box, box
            assert result.token_ids == expected, (trial, name)
            assert not result.stats.drafter_lost
            assert result.stats.verify_rounds > 0


def test_async_with_a_perfect_drafter_never_rolls_back(tiny_dir):
    same = tiny_dir("llama")
    pair = drafting_pair(tiny_runner(same), tiny_runner(same))
    cfg = DecodeConfig(max_new_tokens=60, eos_token_ids=(-1,))
    result, box = pair.generate([5, 6, 7], cfg, PipelineOptions(mode="async", lookahead=4))
    assert box["stats"]["rollbacks"] == 0
    assert result.stats.accepted_tokens == result.stats.drafted_tokens > 0
    assert result.stats.mean_accepted > 1.5
    assert result.token_ids == autoregressive_generate(pair.target, [5, 6, 7], cfg).token_ids


class SlowVerify:
    """The target, each verify `delay` s slower (a bigger target's verify): real time for a
    drafter to pre-draft in."""

    def __init__(self, runner: ModelRunner, delay: float):
        self.runner, self.delay = runner, delay

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def score_tree_hidden(self, context, tree):
        time.sleep(self.delay)
        return self.runner.score_tree_hidden(context, tree)


def test_ssd_with_a_perfect_drafter_answers_from_its_pre_drafts(tiny_dir):
    """The draft is the target: every draft is kept, and the likeliest outcome the drafter
    pre-drafts for ("all kept, then the draft's own next token") is what the target commits,
    so rounds after the first are answered from pre-drafts."""
    same = tiny_dir("llama")
    target = tiny_runner(same)
    pair = drafting_pair(SlowVerify(target, 0.2), tiny_runner(same))
    cfg = DecodeConfig(max_new_tokens=24, eos_token_ids=(-1,), draft_length=3)
    result, box = pair.generate([5, 6, 7], cfg, PipelineOptions(mode="ssd"))
    assert result.token_ids == autoregressive_generate(target, [5, 6, 7], cfg).token_ids
    stats = box["stats"]
    assert stats["hits"] >= 3 and stats["hit_ranks"][0] >= 2, stats
    assert stats["misses"] <= 1  # at most the last round, when the request ends
    assert result.stats.accepted_tokens == result.stats.drafted_tokens


def test_ssd_outcomes_are_ranked_by_the_keep_rate_and_the_drafts_runners_up():
    chain = [1, 2]
    rows = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.5, 0.0, 0.5, 0.0]])  # q1(d1) = 0.6, q2(d2) = 0.5
    after = torch.tensor([0.0, 0.0, 0.2, 0.8])
    got = [(o.kept, o.bonus, round(o.prob, 3)) for o in likely_outcomes(chain, rows, after, 0.5, guesses=2, limit=5)]
    # kept 0: 0.5 x q1's runners-up renormalised (0.75, 0.25); kept 1: 0.5 x 0.5 x q2's
    # runner-up (1.0, token 0); all kept: 0.25 x q3
    assert got == [(0, 2, 0.375), (1, 0, 0.25), (2, 3, 0.2), (0, 0, 0.125), (2, 2, 0.05)]
    assert likely_outcomes(chain, rows, after, 0.95, limit=1)[0].kept == 2  # a draft the target agrees with


@pytest.mark.parametrize("mode", ["sync", "async", "ssd"])
def test_a_drafter_that_stops_mid_request_leaves_the_output_unchanged(tiny_dir, mode):
    pair = drafting_pair(tiny_runner(tiny_dir("llama"), 1024), tiny_runner(tiny_dir("llama", noise=0.3), 1024))
    cfg = DecodeConfig(max_new_tokens=600, eos_token_ids=(-1,))
    expected = autoregressive_generate(pair.target, [9, 8], cfg).token_ids
    result, box = pair.generate([9, 8], cfg, PipelineOptions(mode=mode, lookahead=3), drafter_dies_after=0.3)
    assert result.stats.drafter_lost and result.stats.verify_rounds > 0
    assert result.token_ids == expected


class Corrupting:
    """A drafter's socket that spoils every tree it sends (`edit`), the rest passing through."""

    def __init__(self, dealer, edit):
        self.dealer, self.edit = dealer, edit

    def __getattr__(self, name):
        return getattr(self.dealer, name)

    def send(self, message):
        if isinstance(message, CandidateTree) and len(message.token_ids) > 1:
            self.edit(message)
        return self.dealer.send(message)


@pytest.mark.parametrize("mode", ["sync", "async", "ssd"])
@pytest.mark.parametrize("corrupt", ["token past the vocabulary", "probabilities of the wrong width"])
def test_a_bad_tree_loses_the_drafter_and_the_request_finishes_with_the_target(tiny_dir, mode, corrupt):
    """The verifier checks every tree before the target reads it (an id past the vocabulary
    would index out of the embedding): the request ends with the target's own output."""
    target, draft = tiny_runner(tiny_dir("llama")), tiny_runner(tiny_dir("llama", noise=0.3))
    vocab = target.vocab_size

    def edit(message: CandidateTree) -> None:
        if corrupt.startswith("token"):
            message.token_ids = (*message.token_ids[:-1], vocab + 3)
        else:
            message.draft_probs = torch.full((len(message.token_ids), vocab - 1), 1.0 / (vocab - 1))

    def propose(dealer, session, cfg, opts, cancelled):
        return propose_request(draft, Corrupting(dealer, edit), FINGERPRINT, session, cfg, opts, cancelled=cancelled)

    cfg = DecodeConfig(max_new_tokens=24, eos_token_ids=(-1,))
    result, _ = WirePair(target, propose).generate([4, 9, 7], cfg, PipelineOptions(mode=mode, lookahead=3))
    assert result.stats.drafter_lost and result.stats.accepted_tokens == 0
    assert result.token_ids == autoregressive_generate(target, [4, 9, 7], cfg).token_ids


# ---- sampling -------------------------------------------------------------------------

def sample_sequences(pair: WirePair, params: SamplingParams, opts: PipelineOptions, n: int = SAMPLES,
                     start: int = 0):
    cfgs = [DecodeConfig(max_new_tokens=NEW, sampling=params, seed=seed, draft_length=NEW - 1, eos_token_ids=(-1,))
            for seed in seeds(n, start, seed=5)]
    results, _ = pair.generate_many(PROMPT, cfgs, opts)
    return [tuple(result.token_ids) for result in results]


@pytest.mark.parametrize("mode", ["sync", "async", "ssd"])
def test_sampling_follows_the_target_distribution(tiny_dir, mode):
    target, draft = runners(tiny_dir)
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params)
    samples = sample_sequences(drafting_pair(target, draft), params, PipelineOptions(mode=mode, lookahead=NEW - 1))
    assert chi2_pvalue(samples, probs) > 1e-3


@pytest.mark.parametrize("mode", ["async", "ssd"])
def test_broken_residual_is_caught(tiny_dir, monkeypatch, mode):
    """Power check: the distribution test above fails when the rejection rule is wrong."""
    target, draft = runners(tiny_dir)
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params)
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p / p.sum(-1, keepdim=True))
    pair, opts = drafting_pair(target, draft), PipelineOptions(mode=mode, lookahead=NEW - 1)
    assert caught_pvalue(lambda start, n: sample_sequences(pair, params, opts, n, start), probs) < 1e-6
