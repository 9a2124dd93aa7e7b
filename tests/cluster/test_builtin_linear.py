"""The real linearized built-in (`qwen2.5-coder-1.5b-linear`, the 1.5B with its attention
linearized by `specray linearize`), in the seed paper's setting: speculating with the 0.5B
draft gives exactly its own greedy output, for chains and trees."""

from __future__ import annotations

import pytest

from cluster.local import DecodeConfig

pytestmark = pytest.mark.builtin

PROMPTS = [("Write a Python function that returns the n-th Fibonacci number.", True),
           ("def merge_sorted(a, b):\n", False)]


@pytest.fixture(scope="module")
def linear_engine(builtin_threads):
    from cluster.engine import EngineConfig, LocalEngine

    return LocalEngine(EngineConfig("qwen2.5-coder-1.5b-linear", "qwen2.5-coder-0.5b"), progress=False)


@pytest.mark.parametrize("draft_length,width", [(None, 1), (3, 2)], ids=["chain-adaptive", "tree"])
def test_the_linearized_builtin_speculates_its_own_greedy_output(linear_engine, draft_length, width):
    assert linear_engine.runtime_info()["target"]["linear"].startswith("linear attention in 28 of 28 layers")
    for text, chat in PROMPTS:
        ids = linear_engine.encode(text, chat)
        cfg = DecodeConfig(max_new_tokens=24, draft_length=draft_length, tree_width=width)
        alone = linear_engine.generate(ids, cfg, speculative=False)
        spec = linear_engine.generate(ids, cfg)
        assert spec.token_ids == alone.token_ids and len(alone.token_ids) > 0
        assert spec.stats.target_forwards < alone.stats.target_forwards  # drafts were accepted
