"""Draft heads in their own server, over real ZeroMQ sockets and the protocol, drafting for
the batched engine from the hidden states the verifier sends: each request's greedy output
is the target's alone, sampling keeps the target's distribution (and the check fails when
the acceptance rule is broken)."""

from __future__ import annotations

import pytest
import torch
from test_remote_drafter import Served

import decoding.acceptance as acceptance
from actors.drafters.remote_heads import RemoteHeadsDrafter
from actors.head_drafter import HeadDrafter, HeadProposal
from actors.head_kinds import load_heads
from actors.heads_server import HeadsServer, kept_of
from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.decoder import Request, wait_idle
from cluster.engine import EngineConfig, LocalEngine
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams
from decoding.tree import TokenTree
from protocol import model_fingerprint

import tiny
from sampling_check import MODEL, NEW, PROMPT, chi2_pvalue, exact_sequence_probs
from test_batching import NO_EOS, collect, mixed_requests


class ServedHeads(Served):
    def __init__(self, local: LocalEngine, heads_dir, tree: str, **sizes):
        runner = local.target_runner
        heads = load_heads(heads_dir, runner.model)
        self.heads = HeadDrafter(heads, tree, verify_s=local.verify_costs, **sizes)
        super().__init__(HeadsServer(self.heads), model_fingerprint(runner.vocab_size, local.tokenizer.get_vocab()))

    def drafter(self) -> RemoteHeadsDrafter:
        n = self.heads.heads.n_heads
        return RemoteHeadsDrafter(self.channel(), self.fingerprint, max_draft=n, n_heads=n,
                                  max_nodes=self.heads.max_nodes)


def test_kept_counts_the_walk_along_the_accepted_tokens():
    tree = TokenTree.from_paths(5, [[7, 8, 9], [7, 3], [2]])
    proposal = HeadProposal(tree, [], 0.0, 0.0)
    assert kept_of(proposal, [7, 8, 9]) == 3
    assert kept_of(proposal, [7, 3]) == 2
    assert kept_of(proposal, [7, 9]) == 1  # 9 is not a child of 7
    assert kept_of(proposal, [4]) == 0


@pytest.mark.parametrize("kind,tree,draft_length", [("medusa", "dynamic", None), ("amphista", "static", 3)])
def test_remote_heads_batched_greedy_equals_the_target_alone(tiny_dir, tmp_path, kind, tree, draft_length):
    target = tiny_dir("llama")
    local = LocalEngine(EngineConfig(target, max_len=256), False)
    served = ServedHeads(local, tiny.make_tiny_heads(tmp_path / "heads", target, scale=0.3, kind=kind), tree)
    batch = BatchEngine(local, BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=draft_length),
                        drafter=served.drafter())
    try:
        reqs = mixed_requests(21, 8)
        cancel = {reqs[5].id: 3}
        got, last = collect(batch, reqs, cancel)
        accepted = drafted = 0
        for r in reqs:
            alone = local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids
            if r.id in cancel:
                assert got[r.id] == alone[:len(got[r.id])]
                continue
            assert got[r.id] == alone, r
            accepted += last[r.id].result.stats.accepted_tokens
            drafted += last[r.id].result.stats.drafted_tokens
        if draft_length:
            assert 0 < accepted < drafted  # trees from the server were verified: kept and refused drafts
            assert any(served.heads.predicted)  # the server learned from what was kept
        wait_idle(batch)
        assert batch.pool.available == 3 and not served.server.sessions  # released there too
    finally:
        batch.close()
        served.close()


def test_a_heads_call_without_the_hidden_state_is_refused(tiny_dir, tmp_path):
    from actors.draft_server import DraftRefused
    from protocol import DraftCall

    target = tiny_dir("llama")
    local = LocalEngine(EngineConfig(target, max_len=64), False)
    heads = load_heads(tiny.make_tiny_heads(tmp_path / "h", target), local.target_runner.model)
    server = HeadsServer(HeadDrafter(heads, "dynamic"))
    call = DraftCall(session_id="s", step=1, token_ids=(3, 4), position=0, depth=3, remaining=8, batch=1)
    with pytest.raises(DraftRefused, match="hidden state"):
        server.handle(b"peer", call)


@pytest.fixture(scope="module")
def vocab4_remote_heads(tiny_dir, tmp_path_factory):
    path = tiny_dir("qwen2", **MODEL)
    local = LocalEngine(EngineConfig(path, max_len=64), False)
    heads_dir = tiny.make_tiny_heads(tmp_path_factory.mktemp("rh4") / "heads", path, scale=0.5)
    served = ServedHeads(local, heads_dir, "dynamic", max_nodes=6, top_m=2)
    yield local, served
    served.close()


def remote_heads_samples(local, served, n: int) -> tuple[list[tuple[int, ...]], int, int]:
    batch = BatchEngine(local, BatchConfig(max_seqs=8, draft_length=NEW - 1), drafter=served.drafter())
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(23)).tolist()
    params = SamplingParams(temperature=1.0)
    try:
        reqs = [Request(PROMPT, DecodeConfig(max_new_tokens=NEW, sampling=params, seed=s, eos_token_ids=NO_EOS))
                for s in seeds]
        got, last = collect(batch, reqs, timeout=900)
        drafted = sum(last[r.id].result.stats.drafted_tokens for r in reqs)
        accepted = sum(last[r.id].result.stats.accepted_tokens for r in reqs)
        return [tuple(got[r.id]) for r in reqs], drafted, accepted
    finally:
        batch.close()


def test_remote_heads_batched_sampling_follows_the_target(vocab4_remote_heads):
    local, served = vocab4_remote_heads
    samples, drafted, accepted = remote_heads_samples(local, served, 10_000)
    probs = exact_sequence_probs(local.target_runner, SamplingParams(temperature=1.0))
    assert chi2_pvalue(samples, probs) > 1e-3
    assert 0.05 * drafted < accepted < 0.9 * drafted  # accepts and rejections both ran


def test_remote_heads_sampling_check_catches_a_broken_residual(vocab4_remote_heads, monkeypatch):
    """Keeping p as the residual after a rejected candidate must show up."""
    local, served = vocab4_remote_heads
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p)
    samples, _, _ = remote_heads_samples(local, served, 4000)
    probs = exact_sequence_probs(local.target_runner, SamplingParams(temperature=1.0))
    assert chi2_pvalue(samples, probs) < 1e-6
