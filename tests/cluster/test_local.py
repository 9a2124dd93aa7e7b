"""The decode loop is lossless: greedy output is the target's own, token for token, and
sampled output follows the target's distribution (chi-squared over 10,000 samples)."""

from __future__ import annotations

import pytest
import torch

import decoding.acceptance as acceptance
from cluster.engine import EngineConfig, LocalEngine
from cluster.local import DecodeConfig, autoregressive_generate
from decoding.sampling import SamplingParams

from sampling_check import NEW, PROMPT, caught_pvalue, chi2_pvalue, exact_sequence_probs, runners, sample_sequences


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
def test_greedy_is_token_identical_to_hf_generate(tiny_dir, family):
    engine = LocalEngine(EngineConfig(tiny_dir(family), tiny_dir(family, noise=0.3), draft_dtype="float32"), False)
    gen = torch.Generator().manual_seed(7)
    shapes = [(None, 1), (1, 1), (3, 1), (6, 1), (2, 3), (None, 2), (4, 4)]
    for trial in range(6):
        prompt = torch.randint(2, 64, (int(torch.randint(1, 24, (), generator=gen)),), generator=gen).tolist()
        expected = hf_greedy(engine.target.hf_model, prompt, 48)
        assert engine.generate(prompt, DecodeConfig(max_new_tokens=48), speculative=False).token_ids == expected
        for draft_length, width in shapes:
            cfg = DecodeConfig(max_new_tokens=48, draft_length=draft_length, tree_width=width)
            assert engine.generate(prompt, cfg).token_ids == expected, (trial, draft_length, width)


def test_speculation_accepts_drafts_and_saves_target_forwards(tiny_dir):
    """A draft identical to the target must be accepted whole: the loop really speculates."""
    same = tiny_dir("qwen2")
    engine = LocalEngine(EngineConfig(same, same, draft_dtype="float32"), False)
    result = engine.generate([5, 6, 7], DecodeConfig(max_new_tokens=31, draft_length=4, eos_token_ids=(-1,)))
    assert result.stats.accepted_tokens == result.stats.drafted_tokens == 24
    assert result.stats.mean_accepted == 5.0
    assert result.stats.target_forwards == 1 + 30 // 5


def test_eos_stops_generation(tiny_dir):
    engine = LocalEngine(EngineConfig(tiny_dir("llama"), tiny_dir("llama", noise=0.3), draft_dtype="float32"), False)
    full = engine.generate([3, 4], DecodeConfig(max_new_tokens=30))
    stop = full.token_ids[5]
    cut = engine.generate([3, 4], DecodeConfig(max_new_tokens=30, eos_token_ids=(stop,)))
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop) + 1]


# ---- sampling: the distribution of whole sequences -----------------------------------
SAMPLING_CASES = [
    ("chain", SamplingParams(temperature=1.0), 1),
    ("tree", SamplingParams(temperature=1.0), 3),
    ("chain-top-p", SamplingParams(temperature=1.2, top_p=0.95), 1),
]


@pytest.mark.parametrize("name,params,width", SAMPLING_CASES, ids=[c[0] for c in SAMPLING_CASES])
def test_sampling_matches_target_distribution(tiny_dir, name, params, width):
    target, draft = runners(tiny_dir)
    probs = exact_sequence_probs(target, params)
    samples = sample_sequences(target, draft, params, width)
    assert chi2_pvalue(samples, probs) > 1e-3
    # Control: the target sampling alone passes the same test.
    if name == "chain":
        cfg = DecodeConfig(max_new_tokens=NEW, sampling=params, eos_token_ids=(-1,))
        alone = []
        for s in range(2000):
            cfg.seed = s
            alone.append(tuple(autoregressive_generate(target, PROMPT, cfg).token_ids))
        assert chi2_pvalue(alone, probs) > 1e-3


@pytest.mark.parametrize("width", [1, 3], ids=["chain", "tree"])
def test_broken_residual_is_caught(tiny_dir, monkeypatch, width):
    """Power check: resampling from p instead of norm(max(p - q, 0)) after a rejection is a
    classic bug; the distribution test above must notice it."""
    target, draft = runners(tiny_dir)
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params)
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p / p.sum(-1, keepdim=True))
    draw = lambda start, n: sample_sequences(target, draft, params, width, n=n, start=start)  # noqa: E731
    assert caught_pvalue(draw, probs) < 1e-6
