"""Medusa heads: files, refusals, and lossless decoding with static and dynamic trees."""

from __future__ import annotations

import pytest
import torch

import decoding.acceptance as acceptance
from actors import loading
from actors.head_drafter import HeadDrafter
from actors.head_kinds import load_heads
from actors.heads import HeadsConfig, check_heads, resolve_heads
from actors.pipeline_options import PipelineOptions
from actors.proposing import propose_with_heads
from actors.runner import ModelRunner
from cluster.local import DecodeConfig, autoregressive_generate, heads_generate
from decoding.sampling import SamplingParams
from tests import sampling_check as sc

import tiny
from wire_pair import FINGERPRINT, WirePair

FAMILIES = ("qwen2", "llama", "gemma3")
HEADS_OVER_THE_WIRE = PipelineOptions(mode="sync", heads=True)


def heads_for(tmp_path, model_dir, **kw):
    return tiny.make_tiny_heads(tmp_path / "heads", model_dir, **kw)


def runner_and_heads(tiny_dir, tmp_path, family="qwen2", vocab=64, **kw):
    path = tiny_dir(family, vocab_size=vocab, **kw)
    runner = ModelRunner(loading.load(path, "float32", progress=False).build(), 256)
    return runner, load_heads(heads_for(tmp_path, path, scale=0.3), runner.model)


def test_heads_round_trip_through_bf16_safetensors(tiny_dir, tmp_path):
    runner, heads = runner_and_heads(tiny_dir, tmp_path)
    again = load_heads(tmp_path / "heads", runner.model)
    assert torch.equal(heads.weight, again.weight)
    assert heads.hot_ids.tolist() == list(range(64))
    ids, p = heads.top(torch.randn(64), 5)
    assert ids.shape == p.shape == (3, 5)
    assert bool((p[:, :-1] >= p[:, 1:]).all())
    assert torch.all(p.sum(-1) <= 1.0 + 1e-6)


def test_heads_for_another_model_are_refused_naming_both(tiny_dir, tmp_path):
    path = tiny_dir("qwen2", vocab_size=64)
    other = tiny_dir("qwen2", vocab_size=48)
    heads = heads_for(tmp_path, other)
    with pytest.raises(ValueError, match=rf"trained for .*vocab_size48.*vocabulary 48.*{path}.*vocabulary 64"):
        check_heads(heads, path, 64, 64)
    assert check_heads(heads, other, 64, 48).vocab_size == 48


def test_unknown_heads_name_is_refused_with_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither built-in nor a directory"):
        resolve_heads(str(tmp_path / "missing"), "qwen2.5-coder-1.5b")
    with pytest.raises(ValueError, match="unknown heads kind"):
        HeadsConfig("eagle", "t", 8, 8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_greedy_with_heads_is_token_identical_to_the_target(tiny_dir, tmp_path, family, tree):
    runner, heads = runner_and_heads(tiny_dir, tmp_path, family)
    cfg = DecodeConfig(max_new_tokens=40)
    want = autoregressive_generate(runner, [5, 6, 7, 8], cfg).token_ids
    for costs in ({}, {1: 1.0, 64: 1.0}):  # no curve, and a flat one (a GPU): every node pays
        drafter = HeadDrafter(heads, tree, max_nodes=16, top_m=4, verify_s=costs)
        result = heads_generate(runner, drafter, [5, 6, 7, 8], cfg)
        assert result.token_ids == want
        assert result.stats.verify_rounds < len(want) - 1  # some drafts were accepted
        assert result.stats.drafted_tokens > result.stats.accepted_tokens  # and some rejected


def test_the_drafter_learns_how_far_to_trust_its_heads(tiny_dir, tmp_path):
    runner, heads = runner_and_heads(tiny_dir, tmp_path)
    drafter = HeadDrafter(heads, "dynamic", max_nodes=16, top_m=4, verify_s={1: 1.0, 64: 1.0})
    proposal = drafter.propose(torch.randn(64), 3, max_depth=3)
    assert drafter.calibration == [1.0, 1.0, 1.0]
    for _ in range(30):
        drafter.observe(proposal, 0)  # never accepted: the heads promised too much
    seen = [d for d, mass in enumerate(proposal.depth_mass) if mass > 0]
    assert seen and all(drafter.calibration[d] < 0.9 for d in seen), drafter.calibration
    for _ in range(60):
        drafter.observe(proposal, 3)  # always accepted to the bottom
    assert all(drafter.calibration[d] > 1.0 for d in seen), drafter.calibration


# ---- sampling: the exact target distribution, for static and dynamic trees ----------------------


def sample_with_heads(target, drafter, params, n, counts=None):
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(7)).tolist()
    out = []
    for s in seeds:
        cfg = DecodeConfig(max_new_tokens=sc.NEW, sampling=params, seed=s)
        result = heads_generate(target, drafter, sc.PROMPT, cfg)
        out.append(tuple(result.token_ids))
        if counts is not None:
            counts["drafted"] += result.stats.drafted_tokens
            counts["accepted"] += result.stats.accepted_tokens
    return out


@pytest.fixture(scope="module")
def vocab4(tiny_dir, tmp_path_factory):
    target, _ = sc.runners(tiny_dir)
    path = tiny_dir("qwen2", **sc.MODEL)
    heads = load_heads(tiny.make_tiny_heads(tmp_path_factory.mktemp("h4") / "heads", path, scale=0.5), target.model)
    return target, heads


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_sampling_with_heads_keeps_the_targets_distribution(vocab4, tree):
    target, heads = vocab4
    params = SamplingParams(temperature=1.0)
    drafter = HeadDrafter(heads, tree, max_nodes=6, top_m=2)
    counts = {"drafted": 0, "accepted": 0}
    samples = sample_with_heads(target, drafter, params, sc.SAMPLES, counts)
    assert sc.chi2_pvalue(samples, sc.exact_sequence_probs(target, params)) > 1e-3
    assert 0.1 * counts["drafted"] < counts["accepted"] < 0.9 * counts["drafted"]  # accepts and rejections both ran


def test_a_broken_residual_is_caught(vocab4, monkeypatch):
    """Not zeroing a rejected candidate (keeping p as the residual) must show up."""
    target, heads = vocab4
    params = SamplingParams(temperature=1.0)
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p)
    samples = sample_with_heads(target, HeadDrafter(heads, "dynamic", max_nodes=6, top_m=2), params, 4000)
    assert sc.chi2_pvalue(samples, sc.exact_sequence_probs(target, params)) < 1e-6


# ---- over the wire: the sync pipeline's verifier and a heads drafter on real ZeroMQ sockets ----


def heads_pair(target, drafter) -> WirePair:
    """The target verifying here, draft heads drafting in another thread (sync pipeline)."""
    def propose(dealer, session, cfg, opts, cancelled):
        return propose_with_heads(drafter, dealer, FINGERPRINT, session, cfg, opts, cancelled=cancelled)

    return WirePair(target, propose)


def wire_generate(target, drafter, prompt, cfg):
    result, box = heads_pair(target, drafter).generate(prompt, cfg, HEADS_OVER_THE_WIRE)
    assert "error" not in box, box
    assert not result.stats.drafter_lost
    return result, box["stats"]


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_heads_over_zeromq_give_the_targets_greedy_output(tiny_dir, tmp_path, tree):
    runner, heads = runner_and_heads(tiny_dir, tmp_path, "llama")
    gen = torch.Generator().manual_seed(3)
    drafter = HeadDrafter(heads, tree, max_nodes=16, top_m=4)
    for _ in range(3):
        prompt = torch.randint(2, 64, (int(torch.randint(1, 20, (), generator=gen)),), generator=gen).tolist()
        cfg = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
        expected = autoregressive_generate(runner, prompt, cfg).token_ids
        result, stats = wire_generate(runner, drafter, prompt, cfg)
        assert result.token_ids == expected
        assert result.stats.accepted_tokens > 0 and stats["rounds"] == result.stats.verify_rounds


def test_heads_over_zeromq_keep_the_targets_distribution(vocab4):
    target, heads = vocab4
    params = SamplingParams(temperature=1.0)
    drafter = HeadDrafter(heads, "dynamic", max_nodes=6, top_m=2)
    seeds = torch.randint(0, 2**62, (sc.SAMPLES,), generator=torch.Generator().manual_seed(11)).tolist()
    cfgs = [DecodeConfig(max_new_tokens=sc.NEW, sampling=params, seed=s, eos_token_ids=(-1,)) for s in seeds]
    results, _ = heads_pair(target, drafter).generate_many(sc.PROMPT, cfgs, HEADS_OVER_THE_WIRE)
    samples = [tuple(result.token_ids) for result in results]
    assert sc.chi2_pvalue(samples, sc.exact_sequence_probs(target, params)) > 1e-3


def test_heads_on_a_gguf_target_read_its_quantized_output_rows(tmp_path):
    """A GGUF target keeps its lm_head as blocks: the heads dequantize only their hot rows."""
    from actors.heads import output_rows

    path = tiny.make_tiny_gguf(tmp_path / "q", "qwen2", "Q8_0", "Q8_0", vocab_size=64)
    runner = ModelRunner(loading.load(str(path), "gguf", progress=False).build(), 256)
    hot = torch.tensor([1, 5, 9, 63])
    rows = output_rows(runner.model, hot)
    dense = runner.model.output.qweight.dense()
    assert torch.equal(rows, dense[hot].float())
    heads = load_heads(tiny.make_tiny_heads(tmp_path / "heads", path, hot_vocab=48, scale=0.3), runner.model)
    cfg = DecodeConfig(max_new_tokens=30)
    want = autoregressive_generate(runner, [5, 6, 7], cfg).token_ids
    assert heads_generate(runner, HeadDrafter(heads, "dynamic", max_nodes=8, top_m=4), [5, 6, 7], cfg).token_ids == want
