"""`pipeline: sync` batched: the target decodes many requests in this process while the
draft model (or draft heads) drafts for all of them from its own Ray actor (a local
cluster: 2 CPUs, 2 fake GPUs). Each request's greedy output is the target's alone; the
actor goes when the engine closes."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import ray
import torch
from test_remote_drafter import hold_until_reconnected

from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.decoder import Request
from cluster.engine import EngineConfig, LocalEngine
from cluster.factory import make_decoder
from cluster.spec import DecoderSpec
from decoding.request import DecodeConfig

import tiny
from test_batching import NO_EOS, collect, mixed_requests


@pytest.mark.parametrize("draft_length,pipeline", [(3, "sync"), (None, "sync"), (3, "ssd")])
def test_a_draft_actor_drafts_for_the_batch_and_outputs_are_the_targets(local_ray, tiny_dir, draft_length, pipeline):
    target, draft = tiny_dir("llama"), tiny_dir("llama", noise=0.2)
    spec = DecoderSpec(target=target, draft=draft, pipeline=pipeline, draft_dtype="float32", max_len=256,
                       batch=BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=draft_length))
    assert spec.kind == "remote-drafter"
    alone = LocalEngine(EngineConfig(target, max_len=256), False)
    decoder = make_decoder(spec)
    try:
        assert isinstance(decoder, BatchEngine) and type(decoder.drafter).__name__ == "RemoteDrafter"
        assert decoder.runtime_info()["draft"]["model"] == draft  # /health says where the draft runs
        reqs = mixed_requests(11, 7)
        got, last = collect(decoder, reqs)
        for r in reqs:
            assert got[r.id] == alone.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        if draft_length:
            assert sum(last[r.id].result.stats.accepted_tokens for r in reqs) > 0  # drafts from the actor were kept
    finally:
        decoder.close()
    deadline = time.monotonic() + 30  # the draft actor and its bundle went with the engine
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_heads_actor_drafts_trees_for_the_batch_and_outputs_are_the_targets(local_ray, tiny_dir, tmp_path):
    target = tiny_dir("llama")
    heads = tiny.make_tiny_heads(tmp_path / "heads", target, scale=0.3)
    spec = DecoderSpec(target=target, heads=str(heads), tree="dynamic", pipeline="sync", max_len=256,
                       batch=BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=3))
    assert spec.kind == "remote-drafter"
    alone = LocalEngine(EngineConfig(target, max_len=256), False)
    decoder = make_decoder(spec)
    try:
        assert isinstance(decoder, BatchEngine) and type(decoder.drafter).__name__ == "RemoteHeadsDrafter"
        assert "heads" in decoder.runtime_info()["draft"]["model"]  # /health says the heads run there
        reqs = mixed_requests(12, 6)
        got, last = collect(decoder, reqs)
        for r in reqs:
            assert got[r.id] == alone.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert sum(last[r.id].result.stats.accepted_tokens for r in reqs) > 0  # the actor's trees were kept
    finally:
        decoder.close()


def test_a_draft_actor_that_crashes_is_restarted_and_drafting_resumes(local_ray, tiny_dir):
    """The draft actor's process is killed mid-run: the target decodes on alone (exact), Ray
    restarts the actor, and the running requests draft again on its new server."""
    target, draft = tiny_dir("llama"), tiny_dir("llama", noise=0.2)
    spec = DecoderSpec(target=target, draft=draft, pipeline="sync", draft_dtype="float32", max_len=256,
                       batch=BatchConfig(max_seqs=3, draft_length=3))
    alone = LocalEngine(EngineConfig(target, max_len=256), False)
    decoder = make_decoder(spec)
    drafter, killed, lost = decoder.drafter, [], []
    gen = torch.Generator().manual_seed(8)
    reqs = [Request(torch.randint(2, 64, (7,), generator=gen).tolist(),
                    DecodeConfig(max_new_tokens=60, eos_token_ids=NO_EOS)) for _ in range(3)]

    def kill_then_wait(ev) -> None:
        if ev.token_ids and not killed:
            killed.append(decoder.runtime_info()["draft"]["pid"])
            os.kill(killed[0], signal.SIGKILL)
        elif drafter.lost and not drafter.restarts:
            lost.append(drafter.lost)
            hold_until_reconnected(drafter, 120)  # Ray restarts the actor; its new server answers

    try:
        got, last = collect(decoder, reqs, timeout=180, hook=kill_then_wait)
        for r in reqs:
            assert last[r.id].error is None
            assert got[r.id] == alone.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert any(last[r.id].result.stats.drafter_lost for r in reqs)
        assert drafter.restarts == 1 and drafter.lost is None and "PeerUnreachable" in lost[0]
        assert decoder.runtime_info()["draft"]["pid"] != killed[0]  # /health names the new process
        assert sum(last[r.id].result.stats.accepted_tokens for r in reqs) > 0  # the new actor's drafts were kept
    finally:
        decoder.close()


def test_a_draft_actor_that_hangs_is_replaced_and_the_requests_finish(local_ray, tiny_dir):
    """The draft actor's process is stopped (SIGSTOP: alive, never answering) mid-run: within
    the stuck deadline the target goes on alone (exact), the stuck actor is killed and Ray
    starts a new one, whose server the running requests draft on again."""
    target, draft = tiny_dir("llama"), tiny_dir("llama", noise=0.2)
    spec = DecoderSpec(target=target, draft=draft, pipeline="sync", draft_dtype="float32", max_len=256,
                       batch=BatchConfig(max_seqs=3, draft_length=3))
    alone = LocalEngine(EngineConfig(target, max_len=256), False)
    decoder = make_decoder(spec)
    drafter, stopped, lost = decoder.drafter, [], []
    drafter.stuck_floor_s = 2.0  # tiny models answer in milliseconds; a user's default is 10 s
    gen = torch.Generator().manual_seed(9)
    reqs = [Request(torch.randint(2, 64, (7,), generator=gen).tolist(),
                    DecodeConfig(max_new_tokens=60, eos_token_ids=NO_EOS)) for _ in range(3)]

    def stop_then_wait(ev) -> None:
        if ev.token_ids and not stopped:
            stopped.append(decoder.runtime_info()["draft"]["pid"])
            stopped.append(time.monotonic())
            os.kill(stopped[0], signal.SIGSTOP)
        elif drafter.lost and not drafter.restarts and not lost:
            lost.append((drafter.lost, time.monotonic() - stopped[1]))
            hold_until_reconnected(drafter, 120)  # killed as stuck, restarted by Ray; its new server answers

    try:
        got, last = collect(decoder, reqs, timeout=180, hook=stop_then_wait)
        for r in reqs:
            assert last[r.id].error is None
            assert got[r.id] == alone.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        reason, after_s = lost[0]
        assert "ReceiveTimeout" in reason and after_s < 10  # the stuck deadline, not the 60 s receive timeout
        assert drafter.restarts == 1 and drafter.lost is None
        assert decoder.runtime_info()["draft"]["pid"] != stopped[0]  # a new process drafts
        assert sum(last[r.id].result.stats.accepted_tokens for r in reqs) > 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped[0], signal.SIGKILL)  # never leave a stopped process behind
        decoder.close()


def test_an_ensemble_with_members_in_actors_decodes_batched_as_the_ensemble(local_ray, tiny_dir):
    """CoS across actors, batched: the proposer here, the other member scoring every round's
    batch from its own actor; each greedy output is the ensemble's own."""
    from cluster.ensemble import EnsembleConfig, LocalEnsemble

    members = (tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.3))
    spec = DecoderSpec(ensemble=members, combine="we:0.5", pipeline="sync", max_len=256,
                       batch=BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=3))
    decoder = make_decoder(spec)
    try:
        assert isinstance(decoder, BatchEngine) and type(decoder.verifier).__name__ == "EnsembleVerifier"
        assert list(decoder.verifier.remote) == [1]  # member 0 proposes here, member 1 scores in its actor
        info = decoder.runtime_info()
        assert info["ensemble"]["batched"] and info["members"][members[1]]["model"] == members[1]
        reqs = mixed_requests(13, 6)
        got, last = collect(decoder, reqs)
        alone = LocalEnsemble(EnsembleConfig(models=members, combine="we:0.5", max_len=256), progress=False)
        for r in reqs:
            assert got[r.id] == alone.generate(r.prompt_ids, r.cfg, method="ensemble").token_ids, r
        assert sum(last[r.id].result.stats.accepted_tokens for r in reqs) > 0  # the ensemble kept proposals
    finally:
        decoder.close()
    deadline = time.monotonic() + 30  # the member's actor and its bundle went with the engine
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
