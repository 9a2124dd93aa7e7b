"""Amphista heads: what makes them Amphista (they read the newest token, they see each
other, they start as the lm_head), and the same lossless guarantees as Medusa's."""

from __future__ import annotations

import pytest
import torch

import decoding.acceptance as acceptance
from actors import loading
from actors.amphista import AmphistaHeads
from actors.head_drafter import HeadDrafter
from actors.head_kinds import load_heads
from actors.heads import EmbeddingFromFiles, HeadsConfig, embedding_rows
from actors.runner import ModelRunner
from cluster.local import DecodeConfig, autoregressive_generate, heads_generate
from decoding.sampling import SamplingParams
from tests import sampling_check as sc
from tests.actors.test_heads import sample_with_heads, wire_generate

import tiny


def runner_and_heads(tiny_dir, tmp_path, family="qwen2", vocab=64, **kw):
    path = tiny_dir(family, vocab_size=vocab, **kw)
    runner = ModelRunner(loading.load(path, "float32", progress=False).build(), 256)
    heads_dir = tiny.make_tiny_heads(tmp_path / "heads", path, scale=0.3, kind="amphista")
    return runner, load_heads(heads_dir, runner.model), path


def test_fresh_heads_start_as_the_lm_head(tiny_dir, tmp_path):
    """Every layer writing into the residual stream starts at zero: before training, each
    head scores exactly what the target's own output projection scores."""
    runner, _, path = runner_and_heads(tiny_dir, tmp_path)
    cfg = HeadsConfig("amphista", path, 64, 64, n_heads=3, hot_vocab=64, width=32)
    rows = runner.model.output.weight.detach().float()
    heads = AmphistaHeads(cfg, torch.arange(64), rows)
    hidden, embedded = torch.randn(5, 64), torch.randn(5, 64)
    want = hidden @ rows.T
    assert torch.allclose(heads(hidden, embedded), want.expand(3, -1, -1), atol=1e-5)


def test_a_bad_width_is_refused_before_any_weights_load():
    with pytest.raises(ValueError, match="width 100 must be a multiple of 64"):
        HeadsConfig("amphista", "t", 64, 64, hot_vocab=64, width=100)


def test_heads_read_the_newest_token_and_each_other(tiny_dir, tmp_path):
    _, heads, _ = runner_and_heads(tiny_dir, tmp_path)
    hidden = torch.randn(64)
    _, p_a = heads.top(hidden, 4, token=5)
    _, p_b = heads.top(hidden, 4, token=6)
    assert not torch.equal(p_a, p_b)  # the token the target just chose changes every head's guess
    with pytest.raises(ValueError, match="need the newest token"):
        heads.top(hidden, 4)
    # Bidirectional: moving the last head's position embedding moves the first head's logits.
    emb = heads.embed(torch.tensor([5]))
    before = heads(hidden[None], emb)[0]
    with torch.no_grad():
        # (a constant shift would be normed away)
        heads.block.position[-1] += torch.randn(heads.block.position.shape[-1])
    after = heads(hidden[None], emb)
    assert not torch.allclose(after[0], before)


def test_embedding_rows_from_files_match_the_loaded_model(tiny_dir, tmp_path):
    """The heads actor reads the newest token's embedding from the target's files; the
    engine from the loaded model: the same rows, so the same trees in both placements."""
    runner, heads, path = runner_and_heads(tiny_dir, tmp_path, "llama")
    ids = torch.tensor([0, 7, 63, 7])
    assert torch.equal(EmbeddingFromFiles(path)(ids), embedding_rows(runner.model, ids))
    from_files = load_heads(tmp_path / "heads", path)
    hidden = torch.randn(64)
    assert torch.equal(from_files.top(hidden, 4, 9)[0], heads.top(hidden, 4, 9)[0])


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_greedy_with_amphista_heads_is_token_identical_to_the_target(tiny_dir, tmp_path, family, tree):
    runner, heads, _ = runner_and_heads(tiny_dir, tmp_path, family)
    cfg = DecodeConfig(max_new_tokens=40)
    want = autoregressive_generate(runner, [5, 6, 7, 8], cfg).token_ids
    for costs in ({}, {1: 1.0, 64: 1.0}):
        result = heads_generate(runner, HeadDrafter(heads, tree, max_nodes=16, top_m=4, verify_s=costs),
                                [5, 6, 7, 8], cfg)
        assert result.token_ids == want
        assert result.stats.verify_rounds < len(want) - 1  # some drafts were accepted
        assert result.stats.drafted_tokens > result.stats.accepted_tokens  # and some rejected


def test_greedy_with_amphista_heads_on_a_gguf_target(tmp_path):
    """A GGUF target: the newest token's embedding comes from its quantized blocks."""
    path = tiny.make_tiny_gguf(tmp_path / "q", "qwen2", "Q8_0", "Q8_0", vocab_size=64)
    runner = ModelRunner(loading.load(str(path), "gguf", progress=False).build(), 256)
    heads = load_heads(tiny.make_tiny_heads(tmp_path / "heads", path, hot_vocab=48, scale=0.3, kind="amphista"),
                       runner.model)
    cfg = DecodeConfig(max_new_tokens=30)
    want = autoregressive_generate(runner, [5, 6, 7], cfg).token_ids
    assert heads_generate(runner, HeadDrafter(heads, "dynamic", max_nodes=8, top_m=4), [5, 6, 7], cfg).token_ids == want


@pytest.fixture(scope="module")
def vocab4(tiny_dir, tmp_path_factory):
    target, _ = sc.runners(tiny_dir)
    path = tiny_dir("qwen2", **sc.MODEL)
    heads_dir = tiny.make_tiny_heads(tmp_path_factory.mktemp("a4") / "heads", path, scale=0.5, kind="amphista")
    return target, load_heads(heads_dir, target.model)


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_sampling_with_amphista_heads_keeps_the_targets_distribution(vocab4, tree):
    target, heads = vocab4
    params = SamplingParams(temperature=1.0)
    counts = {"drafted": 0, "accepted": 0}
    samples = sample_with_heads(target, HeadDrafter(heads, tree, max_nodes=6, top_m=2), params, sc.SAMPLES, counts)
    assert sc.chi2_pvalue(samples, sc.exact_sequence_probs(target, params)) > 1e-3
    assert 0.1 * counts["drafted"] < counts["accepted"] < 0.9 * counts["drafted"]


def test_a_broken_residual_is_caught_with_amphista_heads(vocab4, monkeypatch):
    target, heads = vocab4
    params = SamplingParams(temperature=1.0)
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p)
    samples = sample_with_heads(target, HeadDrafter(heads, "dynamic", max_nodes=6, top_m=2), params, 4000)
    assert sc.chi2_pvalue(samples, sc.exact_sequence_probs(target, params)) < 1e-6


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_amphista_heads_over_zeromq_give_the_targets_greedy_output(tiny_dir, tmp_path, tree):
    runner, heads, _ = runner_and_heads(tiny_dir, tmp_path, "llama")
    drafter = HeadDrafter(heads, tree, max_nodes=16, top_m=4)
    for prompt in ([5, 6, 7], [9], [3, 14, 15, 9, 2]):
        cfg = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
        result, stats = wire_generate(runner, drafter, prompt, cfg)
        assert result.token_ids == autoregressive_generate(runner, prompt, cfg).token_ids
        assert result.stats.accepted_tokens > 0 and stats["rounds"] == result.stats.verify_rounds
