"""The real built-in pair (Qwen2.5-Coder 1.5B target, 0.5B draft): greedy speculative output
is token-identical to transformers' own greedy `generate`, for chains and trees, and with
the target's built-in Medusa and Amphista heads (static and dynamic trees)."""

from __future__ import annotations

import pytest
import torch

from cluster.local import DecodeConfig

pytestmark = pytest.mark.builtin

PROMPTS = [
    ("Write a Python function that returns the n-th Fibonacci number.", True),
    ("Explain in two sentences what a hash map is.", True),
    ("def merge_sorted(a, b):\n", False),
]


@pytest.fixture(scope="module")
def expected(builtin_engine):
    out = []
    for text, chat in PROMPTS:
        ids = builtin_engine.encode(text, chat)
        t = torch.tensor([ids])
        ref = builtin_engine.target.hf_model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=24,
                                                      do_sample=False)
        out.append((ids, ref[0, len(ids):].tolist()))
    return out


@pytest.mark.parametrize("draft_length,width", [(None, 1), (3, 2)], ids=["chain-adaptive", "tree"])
def test_builtin_pair_greedy_identical(builtin_engine, expected, draft_length, width):
    for ids, ref in expected:
        result = builtin_engine.generate(ids, DecodeConfig(max_new_tokens=24, draft_length=draft_length,
                                                           tree_width=width))
        assert result.token_ids == ref
        assert result.stats.mean_accepted > 1.0  # the pair agrees often: speculation is really happening


@pytest.mark.parametrize("heads", ["medusa", "amphista"])
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_builtin_heads_greedy_identical(builtin_engine, expected, heads, tree):
    """The shipped heads draft for the real 1.5B: same tokens as transformers, and drafts
    are accepted (the heads learned something; asserted on static trees, which always
    draft, while a dynamic tree's size follows the verify costs timed at load)."""
    accepted = rounds = 0
    for ids, ref in expected:
        result = builtin_engine.generate(ids, DecodeConfig(max_new_tokens=24), tree=tree, heads=heads)
        assert result.token_ids == ref
        accepted, rounds = accepted + result.stats.accepted_tokens, rounds + result.stats.verify_rounds
    if tree == "static":
        assert accepted > 0.2 * rounds


def test_builtin_ar_matches_hf(builtin_engine, expected):
    ids, ref = expected[0]
    assert builtin_engine.generate(ids, DecodeConfig(max_new_tokens=24), speculative=False).token_ids == ref


def test_builtin_gemma3_matches_hf():
    """Gemma3 family on real weights: our forward (AR and self-speculation) equals HF greedy."""
    from cluster.engine import EngineConfig, LocalEngine

    engine = LocalEngine(EngineConfig("gemma-3-270m", "gemma-3-270m"), progress=False)
    ids = engine.encode("def fibonacci(n):")
    t = torch.tensor([ids])
    ref = engine.target.hf_model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=24, do_sample=False)
    ref = ref[0, len(ids):].tolist()
    assert engine.generate(ids, DecodeConfig(max_new_tokens=24), speculative=False).token_ids == ref
    assert engine.generate(ids, DecodeConfig(max_new_tokens=24, tree_width=2)).token_ids == ref


def test_builtin_gguf_target_against_its_fp32_conversion(builtin_engine, expected):
    """The 1.5B as its GGUF file (Q4_K/Q6_K on the native kernels) against transformers'
    fp32 dequantization of the same file: the weights are the same numbers, the products
    differ only by the int8 rounding of activations. Teacher-forced on the fp32 model's
    greedy continuations, the two pick the same next token almost always (BENCHMARKS.md
    gives the rate), and speculation on the GGUF target is exactly that target alone."""
    from actors import loading
    from actors.runner import ModelRunner
    from cluster.local import autoregressive_generate, speculative_generate

    gguf = ModelRunner.for_serving(loading.load("qwen2.5-coder-1.5b", "gguf", progress=False).build(), 512)
    fp32 = builtin_engine.target_runner
    agree = total = 0
    for ids, ref in expected:
        seq = torch.tensor(ids + ref)
        outs = []
        for runner in (gguf, fp32):
            runner.reset()
            outs.append(runner.model(seq, runner.cache)[len(ids) - 1:-1])
        agree += int((outs[0].argmax(-1) == outs[1].argmax(-1)).sum())
        total += len(ref)
    assert agree / total >= 0.9, (agree, total)
    ids = expected[0][0]
    cfg = DecodeConfig(max_new_tokens=24, eos_token_ids=builtin_engine.eos_token_ids)
    alone = autoregressive_generate(gguf, ids, cfg).token_ids
    spec = speculative_generate(gguf, builtin_engine.draft_runner, ids, cfg)
    assert spec.token_ids == alone and spec.stats.mean_accepted > 1.5


def test_builtin_needle_is_found_and_sparse_drafting_keeps_the_targets_text(builtin_engine):
    """Long context on the real pair (~1.5k tokens, what the test budget affords): the target
    retrieves a needle from a haystack of prose and code; drafting sparsely (TidalDecode,
    budget 64 of ~1.5k positions) by the draft model or by the target itself gives exactly
    the target's tokens, from one prefill per model."""
    from cluster.bench_long import LongMethods
    from cluster.long_prompts import needle_found, needle_prompts

    prompt = needle_prompts(builtin_engine.tokenizer, 1664, depths=(0.4,))[0]
    ids = builtin_engine.encode(prompt.text, chat=True)
    cfg = DecodeConfig(max_new_tokens=16, eos_token_ids=tuple(builtin_engine.eos_token_ids))
    runners = (builtin_engine.target_runner, builtin_engine.draft_runner)
    snaps = []
    for runner in runners:
        runner.reset(cfg.cache_room(len(ids)))
        runner.prefill(ids)
        snaps.append(runner.snapshot())
    methods, outputs = LongMethods(builtin_engine, budget=64), {}
    for method in ("ar", "spec-tidal-draft", "self-tidal"):
        for runner, snap in zip(runners, snaps):
            runner.restore(snap)
        outputs[method] = methods.run(method, ids, cfg, 1664)
    assert needle_found(prompt.answer, builtin_engine.decode(outputs["ar"].token_ids)), prompt.answer
    for method in ("spec-tidal-draft", "self-tidal"):
        assert outputs[method].token_ids == outputs["ar"].token_ids, method
        assert outputs[method].stats.accepted_tokens > 0, method
