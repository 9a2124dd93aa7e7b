"""Every drafter behind the one batched round is exact: Medusa and Amphista heads give each
request the target's own greedy output whatever shares the batch, and keep the target's
distribution under sampling (and the check fails when the acceptance rule is broken)."""

from __future__ import annotations

import pytest
import torch

import decoding.acceptance as acceptance
from actors.drafters.heads import HeadsDrafter
from actors.head_drafter import HeadDrafter
from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.decoder import Request, wait_idle
from cluster.engine import EngineConfig, LocalEngine
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams

import tiny
from sampling_check import MODEL, NEW, PROMPT, chi2_pvalue, exact_sequence_probs
from test_batching import NO_EOS, collect, mixed_requests


@pytest.fixture(scope="module", params=[("medusa", "dynamic"), ("amphista", "static")], ids=lambda p: "-".join(p))
def heads_engine(request, tiny_dir, tmp_path_factory):
    kind, tree = request.param
    target = tiny_dir("llama")
    heads = tiny.make_tiny_heads(tmp_path_factory.mktemp(kind) / "heads", target, scale=0.3, kind=kind)
    engine = LocalEngine(EngineConfig(target, heads=str(heads), tree=tree, max_len=256), False)
    # Trees are sized by verify costs; flat ones make drafting always pay, so what these tests
    # draft does not hang on how busy the machine was when it timed its forwards (in CI a
    # busy moment once sized every tree down to its root: nothing drafted, nothing accepted).
    engine.verify_costs = {k: 0.05 for k in (1, 2, 4, 8, 16, 32, 64)}
    return engine


@pytest.mark.parametrize("draft_length", [None, 3])
def test_heads_batched_greedy_equals_the_target_alone(heads_engine, draft_length):
    local = heads_engine
    batch = BatchEngine(local, BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=draft_length))
    try:
        assert isinstance(batch.drafter, HeadsDrafter)
        reqs = mixed_requests(21, 8)
        cancel = {reqs[5].id: 3}
        got, last = collect(batch, reqs, cancel)
        accepted = 0
        for r in reqs:
            alone = local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids
            if r.id in cancel:
                assert got[r.id] == alone[:len(got[r.id])]
                continue
            assert got[r.id] == alone, r
            accepted += last[r.id].result.stats.accepted_tokens
        if draft_length:
            assert accepted > 0  # the heads' trees were verified and some drafts kept
        wait_idle(batch)
        assert batch.pool.available == 3 and batch.scheduler.reserved == 0
    finally:
        batch.close()


def test_heads_batched_logprobs_are_the_targets(heads_engine):
    batch = BatchEngine(heads_engine, BatchConfig(max_seqs=2, draft_length=3))
    try:
        cfg = DecodeConfig(max_new_tokens=16, eos_token_ids=NO_EOS)
        spec, plain = Request([4, 5, 6], cfg, True, logprobs=2), Request([4, 5, 6], cfg, False, logprobs=2)
        got, last = collect(batch, [spec, plain])
        assert got[spec.id] == got[plain.id]
    finally:
        batch.close()


@pytest.fixture(scope="module")
def vocab4_heads(tiny_dir, tmp_path_factory):
    path = tiny_dir("qwen2", **MODEL)
    local = LocalEngine(EngineConfig(path, max_len=64), False)
    heads_dir = tiny.make_tiny_heads(tmp_path_factory.mktemp("h4") / "heads", path, scale=0.5)
    from actors.head_kinds import load_heads

    return local, load_heads(heads_dir, local.target_runner.model)


def heads_samples(local, heads, tree: str, n: int) -> tuple[list[tuple[int, ...]], int, int]:
    """n sequences of NEW tokens, 8 requests at a time, one seed each; (samples, drafted, accepted)."""
    drafter = HeadsDrafter(HeadDrafter(heads, tree, max_nodes=6, top_m=2))
    batch = BatchEngine(local, BatchConfig(max_seqs=8, draft_length=NEW - 1), drafter=drafter)
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(temperature=1.0)
    try:
        reqs = [Request(PROMPT, DecodeConfig(max_new_tokens=NEW, sampling=params, seed=s, eos_token_ids=NO_EOS))
                for s in seeds]
        got, last = collect(batch, reqs, timeout=600)
        drafted = sum(last[r.id].result.stats.drafted_tokens for r in reqs)
        accepted = sum(last[r.id].result.stats.accepted_tokens for r in reqs)
        return [tuple(got[r.id]) for r in reqs], drafted, accepted
    finally:
        batch.close()


def test_heads_batched_sampling_follows_the_target(vocab4_heads):
    local, heads = vocab4_heads
    samples, drafted, accepted = heads_samples(local, heads, "dynamic", 10_000)
    probs = exact_sequence_probs(local.target_runner, SamplingParams(temperature=1.0))
    assert chi2_pvalue(samples, probs) > 1e-3
    assert 0.05 * drafted < accepted < 0.9 * drafted  # accepts and rejections both ran


def test_heads_batched_sampling_check_catches_a_broken_residual(vocab4_heads, monkeypatch):
    """Keeping p as the residual after a rejected candidate must show up."""
    local, heads = vocab4_heads
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p)
    samples, _, _ = heads_samples(local, heads, "dynamic", 4000)
    probs = exact_sequence_probs(local.target_runner, SamplingParams(temperature=1.0))
    assert chi2_pvalue(samples, probs) < 1e-6


# ---- the target drafting for itself (sparse attention over its own cache) -------------------


@pytest.fixture(scope="module")
def self_engine(tmp_path_factory):
    """3 layers (select, sparse, sparse) and prompts past the budget: the drafts really are sparse."""
    path = tiny.make_tiny(tmp_path_factory.mktemp("self") / "t", max_position_embeddings=1024, num_hidden_layers=3)
    return LocalEngine(EngineConfig(str(path), "self", draft_attention="tidal:16", max_len=512), False)


def test_self_draft_batched_greedy_equals_the_target_alone(self_engine):
    local = self_engine
    # a fixed k: whether drafting pays on this machine is the policy's call, not this test's
    batch = BatchEngine(local, BatchConfig(max_seqs=3, prefill_tokens=512, draft_length=4))
    try:
        assert type(batch.drafter).__name__ == "SelfDrafter"
        gen = torch.Generator().manual_seed(4)
        reqs = [Request(torch.randint(2, 64, (int(n),), generator=gen).tolist(),
                        DecodeConfig(max_new_tokens=int(m), eos_token_ids=NO_EOS))
                for n, m in zip(torch.randint(40, 300, (6,), generator=gen), torch.randint(2, 30, (6,), generator=gen))]
        got, last = collect(batch, reqs)
        for r in reqs:
            assert got[r.id] == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert sum(last[r.id].result.stats.verify_rounds for r in reqs) > 0  # it really drafted
        wait_idle(batch)
        assert batch.pool.available == 3
    finally:
        batch.close()


def test_self_draft_batched_sampling_follows_the_target(tiny_dir):
    """Two layers (layer 0 selects, layer 1 reads sparsely), a prompt past the budget of 3."""
    from sampling_check import LONG_PROMPT

    path = tiny_dir("qwen2", **(MODEL | {"num_hidden_layers": 2}))
    local = LocalEngine(EngineConfig(path, "self", draft_attention="tidal:3:0", max_len=64), False)
    batch = BatchEngine(local, BatchConfig(max_seqs=8, draft_length=NEW - 1))
    params = SamplingParams(temperature=1.0)
    seeds = torch.randint(0, 2**62, (10_000,), generator=torch.Generator().manual_seed(8)).tolist()
    try:
        reqs = [Request(LONG_PROMPT, DecodeConfig(max_new_tokens=NEW, sampling=params, seed=s, eos_token_ids=NO_EOS))
                for s in seeds]
        got, _ = collect(batch, reqs, timeout=600)
    finally:
        batch.close()
    probs = exact_sequence_probs(local.target_runner, params, LONG_PROMPT)
    assert chi2_pvalue([tuple(got[r.id]) for r in reqs], probs) > 1e-3


# ---- prompt lookup (drafts copied from earlier tokens, no model) -----------------------------


@pytest.fixture(scope="module")
def ngram_engine(tiny_dir):
    engine = LocalEngine(EngineConfig(tiny_dir("llama"), "ngram", max_len=256), False)
    engine.verify_costs = {k: 0.05 for k in (1, 2, 4, 8, 16)}  # flat: drafting a match always pays
    return engine


@pytest.mark.parametrize("draft_length", [None, 3])
def test_ngram_batched_greedy_equals_the_target_alone(ngram_engine, draft_length):
    local = ngram_engine
    batch = BatchEngine(local, BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=draft_length))
    try:
        assert type(batch.drafter).__name__ == "NgramDrafter"
        gen = torch.Generator().manual_seed(12)
        # repetitive prompts (a phrase said three times) and a tiny model that loops: matches happen
        reqs = [Request(torch.randint(2, 64, (int(n),), generator=gen).tolist() * 3,
                        DecodeConfig(max_new_tokens=int(m), eos_token_ids=NO_EOS))
                for n, m in zip(torch.randint(2, 12, (6,), generator=gen), torch.randint(2, 40, (6,), generator=gen))]
        got, last = collect(batch, reqs)
        for r in reqs:
            assert got[r.id] == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert sum(last[r.id].result.stats.accepted_tokens for r in reqs) > 0  # it really drafted
        wait_idle(batch)
        assert batch.pool.available == 3
    finally:
        batch.close()


def ngram_samples(local: LocalEngine, n: int, start: int = 0) -> tuple[list[tuple[int, ...]], int, int]:
    from sampling_check import LONG_PROMPT, seeds

    batch = BatchEngine(local, BatchConfig(max_seqs=8, draft_length=NEW - 1))
    params = SamplingParams(temperature=1.0)
    try:
        reqs = [Request(LONG_PROMPT, DecodeConfig(max_new_tokens=NEW, sampling=params, seed=s, eos_token_ids=NO_EOS))
                for s in seeds(n, start)]
        got, last = collect(batch, reqs, timeout=600)
    finally:
        batch.close()
    drafted = sum(last[r.id].result.stats.drafted_tokens for r in reqs)
    accepted = sum(last[r.id].result.stats.accepted_tokens for r in reqs)
    return [tuple(got[r.id]) for r in reqs], drafted, accepted


@pytest.fixture(scope="module")
def vocab4_ngram(tiny_dir):
    local = LocalEngine(EngineConfig(tiny_dir("qwen2", **MODEL), "ngram", max_len=64), False)
    local.verify_costs = {k: 0.05 for k in (1, 2, 4, 8, 16)}
    return local


def test_ngram_batched_sampling_follows_the_target(vocab4_ngram):
    from sampling_check import LONG_PROMPT

    samples, drafted, accepted = ngram_samples(vocab4_ngram, 10_000)
    probs = exact_sequence_probs(vocab4_ngram.target_runner, SamplingParams(temperature=1.0), LONG_PROMPT)
    assert chi2_pvalue(samples, probs) > 1e-3
    assert 0.05 * drafted < accepted < 0.9 * drafted  # accepts and rejections both ran


def test_ngram_batched_sampling_check_catches_a_broken_residual(vocab4_ngram, monkeypatch):
    """Keeping p as the residual after a rejected lookup must show up."""
    from sampling_check import LONG_PROMPT, caught_pvalue

    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p)
    probs = exact_sequence_probs(vocab4_ngram.target_runner, SamplingParams(temperature=1.0), LONG_PROMPT)
    assert caught_pvalue(lambda start, n: ngram_samples(vocab4_ngram, n, start)[0], probs) < 1e-6


def test_ngram_decodes_through_the_factory_even_one_request_at_a_time(tiny_dir):
    from cluster.factory import make_decoder
    from cluster.spec import DecoderSpec

    dec = make_decoder(DecoderSpec(target=tiny_dir("llama"), draft="ngram", max_len=128))
    try:
        assert isinstance(dec, BatchEngine) and dec.cfg.max_seqs == 1
        cfg = DecodeConfig(max_new_tokens=12, eos_token_ids=NO_EOS)
        assert dec.generate([5, 6, 7] * 4, cfg).token_ids == dec.engine.generate([5, 6, 7] * 4, cfg, False).token_ids
        with pytest.raises(ValueError, match="batched engine"):
            dec.engine.generate([5, 6, 7], cfg)  # no single-request loop to fall back to silently
    finally:
        dec.close()
