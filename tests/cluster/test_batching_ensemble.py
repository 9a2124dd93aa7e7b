"""CoS batched: an ensemble's proposer drafts for every running request and the ensemble
verifies all trees in one round (`cluster/batching/ensemble.py`). Each request's greedy
output is the ensemble's own (standard collaborative decoding, one token at a time),
whatever shares the batch; under sampling the output follows the combined distribution
(and the check fails when the acceptance rule is broken)."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
import torch
from test_remote_drafter import Served

import decoding.acceptance as acceptance
from actors.drafters.draft_model import DraftModelDrafter
from actors.ensemble_verifier import EnsembleVerifier
from actors.member_server import MemberServer
from actors.remote_member import RemoteMember
from cluster.batching.engine import BatchEngine
from cluster.batching.ensemble import LoadedEnsemble, ensemble_engine
from cluster.batching.scheduler import BatchConfig
from cluster.decoder import Request, wait_idle
from cluster.ensemble import EnsembleConfig
from cluster.factory import make_decoder
from cluster.spec import DecoderSpec
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams
from protocol import Role, model_fingerprint

from sampling_check import MODEL, NEW, PROMPT, chi2_pvalue, exact_combined_probs
from test_batching import NO_EOS, collect, mixed_requests


def decode_and_compare(batch, ensemble, reqs, cancelled: int, draft_length) -> None:
    """Every output (the `cancelled`-th request's up to where it was cut) is the ensemble's
    own, decoded alone one token at a time."""
    cancel = {reqs[cancelled].id: 3}
    got, last = collect(batch, reqs, cancel)
    wait_idle(batch)
    drafted = accepted = 0
    for r in reqs:
        alone = ensemble.generate(r.prompt_ids, r.cfg, method="ensemble").token_ids
        if r.id in cancel:
            assert got[r.id] == alone[:len(got[r.id])]
            continue
        assert got[r.id] == alone, r
        drafted += last[r.id].result.stats.drafted_tokens
        accepted += last[r.id].result.stats.accepted_tokens
    if draft_length:
        assert 0 < accepted < drafted  # the proposer's drafts were judged by the ensemble: kept and refused


@pytest.mark.parametrize("combine,draft_length", [("we:0.5", None), ("cd:0.3", 3)])
def test_cos_batched_greedy_equals_the_ensemble_alone(tiny_dir, combine, draft_length):
    members = (tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.3))
    spec = DecoderSpec(ensemble=members, combine=combine, pipeline="local", max_len=256,
                       batch=BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=draft_length))
    batch = make_decoder(spec)
    try:
        assert isinstance(batch, BatchEngine) and isinstance(batch.verifier, EnsembleVerifier)
        assert isinstance(batch.drafter, DraftModelDrafter)
        decode_and_compare(batch, batch.engine.ensemble, mixed_requests(31, 8), 3, draft_length)
        assert all(pool.available == 3 for pool in batch.verifier.pools.values()) and not batch.verifier.slots
        assert batch.runtime_info()["ensemble"]["batched"]
    finally:
        batch.close()


@pytest.fixture(scope="module")
def vocab4_cos(tiny_dir):
    members = (tiny_dir("qwen2", **MODEL), tiny_dir("qwen2", **MODEL, noise=0.3))
    cfg = EnsembleConfig(models=members, combine="we:0.5", max_len=64)
    batch = ensemble_engine(cfg, BatchConfig(max_seqs=8, draft_length=NEW - 1))
    ensemble = batch.engine.ensemble
    probs = exact_combined_probs(ensemble.runners, cfg.rule, SamplingParams(temperature=1.0))
    yield batch, probs
    batch.close()


def cos_samples(batch, n: int) -> tuple[list[tuple[int, ...]], int, int]:
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(29)).tolist()
    params = SamplingParams(temperature=1.0)
    reqs = [Request(PROMPT, DecodeConfig(max_new_tokens=NEW, sampling=params, seed=s, eos_token_ids=NO_EOS))
            for s in seeds]
    got, last = collect(batch, reqs, timeout=900)
    drafted = sum(last[r.id].result.stats.drafted_tokens for r in reqs)
    accepted = sum(last[r.id].result.stats.accepted_tokens for r in reqs)
    return [tuple(got[r.id]) for r in reqs], drafted, accepted


def test_cos_batched_sampling_follows_the_combined_distribution(vocab4_cos):
    batch, probs = vocab4_cos
    samples, drafted, accepted = cos_samples(batch, 10_000)
    assert chi2_pvalue(samples, probs) > 1e-3
    assert 0.05 * drafted < accepted < 0.95 * drafted  # accepts and rejections both ran


def test_cos_batched_sampling_check_catches_a_broken_residual(vocab4_cos, monkeypatch):
    """Keeping r as the residual after a rejection (instead of norm(max(0, r - q))) must show up."""
    batch, probs = vocab4_cos
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p)
    samples, _, _ = cos_samples(batch, 4000)
    assert chi2_pvalue(samples, probs) < 1e-6


# ---- members in other processes: scoring over the protocol (actors/member_server.py) ----

def placed_engine(loaded: LoadedEnsemble, cfg: BatchConfig, secret: str | None = None):
    """The batched ensemble with member 1 behind a real ZeroMQ socket (its own server thread,
    as its actor runs it) and member 0 here, proposing: what `pipeline: sync` builds with Ray."""
    runners = loaded.ensemble.runners
    room = 256 + 2 * cfg.max_draft + 3
    fingerprint = model_fingerprint(runners[1].vocab_size, loaded.tokenizer.get_vocab())
    served = Served(MemberServer(runners[1].model, cfg.max_seqs, room), fingerprint, secret, role=Role.PEER)
    remote = RemoteMember(served.channel(), fingerprint, "member-1", timeout_s=60, on_close=served.close)
    drafter = DraftModelDrafter(runners[0].model, cfg.max_seqs, 256 + cfg.max_draft + 2, cfg.max_draft)
    drafter.measure(runners[0], loaded.verify_costs)
    members = [runners[0].model, remote]
    engine = BatchEngine(loaded, cfg, drafter=drafter,
                         verifier=lambda r: EnsembleVerifier(members, loaded.ensemble.cfg.rule, cfg.max_seqs, r))
    return engine, served, remote


@pytest.fixture(scope="module")
def loaded_pair(tiny_dir):
    members = (tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.3))
    return LoadedEnsemble(EnsembleConfig(models=members, combine="we:0.5", max_len=256))


@pytest.mark.parametrize("draft_length,tcp", [(None, False), (3, True)])
def test_cos_with_a_member_elsewhere_greedy_equals_the_ensemble_alone(loaded_pair, draft_length, tcp):
    batch, served, remote = placed_engine(loaded_pair, BatchConfig(max_seqs=3, prefill_tokens=16,
                                                                   draft_length=draft_length),
                                          secret=secrets.token_hex(32) if tcp else None)
    try:
        decode_and_compare(batch, loaded_pair.ensemble, mixed_requests(37, 8), 5, draft_length)
        assert served.server.rounds > 0 and not served.server.held  # it scored, and every sequence was let go
        assert served.server.pool.available == 3 and batch.verifier.pool.available == 3
        assert batch.health() is None
    finally:
        batch.close()


def test_cos_with_a_member_elsewhere_samples_as_with_every_member_here(loaded_pair):
    """Seeded sampling gives the same tokens as the in-process batched ensemble (whose
    distribution the chi-squared tests above check): the remote rows are the same rows."""
    params = SamplingParams(temperature=1.0)
    reqs = [Request(list(range(3, 3 + n)), DecodeConfig(max_new_tokens=24, sampling=params, seed=s,
                                                        eos_token_ids=NO_EOS))
            for n, s in ((5, 1), (17, 2), (9, 3), (30, 4))]
    cfg = BatchConfig(max_seqs=4, prefill_tokens=16, draft_length=3)
    runners = loaded_pair.ensemble.runners
    here = BatchEngine(loaded_pair, cfg, drafter=DraftModelDrafter(runners[0].model, 4, 256 + cfg.max_draft + 2,
                                                                    cfg.max_draft),
                       verifier=lambda r: EnsembleVerifier([m.model for m in runners], loaded_pair.ensemble.cfg.rule,
                                                           4, r))
    try:
        expected, _ = collect(here, [dataclasses.replace(r) for r in reqs])
    finally:
        here.close()
    batch, served, _ = placed_engine(loaded_pair, cfg)
    try:
        got, last = collect(batch, reqs)
        assert [got[r.id] for r in reqs] == [expected[r.id] for r in reqs]
        assert sum(last[r.id].result.stats.drafted_tokens for r in reqs) > 0
    finally:
        batch.close()


def test_a_member_that_stops_answering_fails_the_round_and_health_says_so(loaded_pair):
    batch, served, remote = placed_engine(loaded_pair, BatchConfig(max_seqs=2, prefill_tokens=16))
    try:
        served.close()  # the member's process is gone: its socket no longer answers
        remote.timeout_s = 1.0
        reqs = mixed_requests(41, 2)
        _, last = collect(batch, reqs)
        assert all(last[r.id].finish_reason == "error" and "member-1" in last[r.id].error for r in reqs)
        assert "member-1" in batch.health()
        assert batch.verifier.pool.available == 2  # the slots here went back
    finally:
        batch.close()
