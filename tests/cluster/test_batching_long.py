"""Long-context models under continuous batching: sparse (TidalDecode) drafts and targets
and linearized models decode many requests per round like any other.

What must hold: a sparse draft leaves each request's output the target's own; a target
attending sparsely (approximate) gives batched what it gives alone, labelled approximate;
a linearized target or draft gives the linearized target's own output. Prompts of 40-300
tokens under a budget of 16, so the sparse steps really are sparse.
"""

from __future__ import annotations

import pytest
import torch

from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.decoder import Request, wait_idle
from cluster.engine import EngineConfig, LocalEngine
from cluster.factory import make_decoder
from cluster.spec import DecoderSpec
from decoding.request import DecodeConfig

from test_batching import NO_EOS, collect


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    """3 layers (a full layer, then select and sparse under `tidal:16:1`), room for 1k tokens."""
    from tiny import make_tiny

    root = tmp_path_factory.mktemp("long-batch")
    kw = dict(max_position_embeddings=1024, num_hidden_layers=3)
    return str(make_tiny(root / "t", **kw)), str(make_tiny(root / "d", noise=0.3, **kw))


def long_requests(seed: int, n: int, lo: int = 40, hi: int = 300) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(2, 64, (int(p),), generator=gen).tolist(),
                    DecodeConfig(max_new_tokens=int(m), eos_token_ids=NO_EOS), speculative=i % 4 != 1)
            for i, (p, m) in enumerate(zip(torch.randint(lo, hi, (n,), generator=gen),
                                           torch.randint(2, 30, (n,), generator=gen)))]


def decode_batched(local: LocalEngine, reqs: list[Request], draft_length: int | None = 4) -> dict:
    batch = BatchEngine(local, BatchConfig(max_seqs=3, prefill_tokens=128, draft_length=draft_length))
    try:
        got, last = collect(batch, reqs)
        wait_idle(batch)
        assert batch.pool.available == 3 and batch.scheduler.reserved == 0  # every slot freed
    finally:
        batch.close()
    return {r.id: (got[r.id], last[r.id].result) for r in reqs}


def test_a_sparse_draft_batched_gives_the_targets_output(long_pair):
    target, draft = long_pair
    local = LocalEngine(EngineConfig(target, draft, draft_dtype="float32", draft_attention="tidal:16:1",
                                     max_len=512), False)
    assert local.draft_runner.attention is not None
    reqs = long_requests(5, 7)
    out = decode_batched(local, reqs)
    for r in reqs:
        tokens, result = out[r.id]
        assert tokens == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert result.stats.labels["approximate"] is False
        if r.speculative:
            assert result.stats.labels["draft_attention"] == "tidal:16:1"
    assert sum(out[r.id][1].stats.accepted_tokens for r in reqs) > 0  # it really speculated


def test_a_sparse_target_batched_gives_what_it_gives_alone_labelled_approximate(long_pair):
    """Without drafts every step is one token per sequence: batched, each sequence's sparse
    selection is its own, so the approximate model's output is the same as alone."""
    target, draft = long_pair
    local = LocalEngine(EngineConfig(target, draft, draft_dtype="float32", attention="tidal:16:1", max_len=512),
                        False)
    reqs = long_requests(6, 6)
    for r in reqs:
        r.speculative = False
    out = decode_batched(local, reqs, draft_length=0)
    for r in reqs:
        alone = local.generate(r.prompt_ids, r.cfg, speculative=False)
        assert out[r.id][0] == alone.token_ids, r
        assert out[r.id][1].stats.labels["approximate"] is True
    full = LocalEngine(EngineConfig(target, max_len=512), False)
    assert any(out[r.id][0] != full.generate(r.prompt_ids, r.cfg, speculative=False).token_ids for r in reqs), \
        "the sparse target decoded exactly the full one: the test's budget does not bite"
    spec = decode_batched(local, long_requests(6, 3))  # speculating on it runs, and says what it is
    assert all(result.stats.labels["approximate"] is True for _, result in spec.values())


@pytest.mark.parametrize("which", ["target", "draft"])
def test_a_linearized_model_batched_gives_the_targets_output(tiny_linear, tiny_dir, which):
    linear = tiny_linear("qwen2", max_position_embeddings=1024)
    plain = tiny_dir("qwen2", noise=0.3, max_position_embeddings=1024)
    target, draft = (linear, plain) if which == "target" else (tiny_dir("qwen2", max_position_embeddings=1024),
                                                               tiny_linear("qwen2", seed=1))
    local = LocalEngine(EngineConfig(target, draft, draft_dtype="float32", max_len=512), False)
    reqs = long_requests(7, 7, lo=3, hi=120)
    out = decode_batched(local, reqs)
    for r in reqs:
        assert out[r.id][0] == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
    assert sum(out[r.id][1].stats.accepted_tokens for r in reqs) > 0


def test_the_factory_batches_long_context_specs(long_pair):
    target, draft = long_pair
    dec = make_decoder(DecoderSpec(target=target, draft=draft, draft_dtype="float32", draft_attention="tidal:16:1",
                                   max_len=512, batch=BatchConfig(max_seqs=2)))
    try:
        assert isinstance(dec, BatchEngine)
    finally:
        dec.close()
