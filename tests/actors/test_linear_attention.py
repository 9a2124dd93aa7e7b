"""Linearized attention that speculative decoding can verify (actors.linear_attention).

What must hold: verifying several tokens at once (a chain, a token tree) gives the logits
of decoding them one at a time; committing an accepted path and rolling back rejected
drafts leave the recurrent state exactly as decoding alone would; speculation with a
linearized target or draft is the linearized model's own output, greedy and sampled.
Tiny models use groups of 4 positions and a 3-tap convolution, so every test crosses group
boundaries inside a verify. Tolerance: 1e-4 on logits of magnitude ~5 (fp32; a verify sums
the current group's past keys in another order than the folded state a step reads).
"""

from __future__ import annotations

import pytest
import torch

from actors import linear_attention as lin
from actors import loading
from actors.linear_attention import LinearConfig, LinearState
from actors.runner import ModelRunner
from cluster.local import DecodeConfig, autoregressive_generate, speculative_generate
from decoding.sampling import SamplingParams
from decoding.tree import TokenTree

from sampling_check import LONG_PROMPT, MODEL, caught_pvalue, chi2_pvalue, exact_sequence_probs, sample_sequences

TOL = dict(rtol=1e-4, atol=1e-4)


def model_of(path: str):
    return loading.load(path, "float32", progress=False).build()


def runner(path: str, max_len: int = 256) -> ModelRunner:
    return ModelRunner(model_of(path), max_len)


def tokens_of(n: int, vocab: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def one_by_one(model, tokens: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(len(tokens) + 8)
    return torch.cat([model(tokens[i:i + 1], cache) for i in range(len(tokens))])


# ---- configuration and loading -----------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(group=0), dict(features=0), dict(conv=0), dict(layers=(1, 1)),
                                 dict(layers=(-1,))])
def test_bad_linear_configs_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="LinearConfig"):
        LinearConfig(**bad)


def test_a_linearized_directory_loads_by_name_with_its_bases_tokenizer(tiny_linear, tiny_dir):
    path = tiny_linear("qwen2")
    loaded = loading.load(path, "float32", progress=False)
    model = loaded.build()
    assert model.config.linear == LinearConfig(group=4, features=8, conv=3)
    assert set(model.config.layer_types) == {"linear_attention"}
    assert loaded.tokenizer.get_vocab() == loading.load_tokenizer(tiny_dir("qwen2")).get_vocab()
    assert loading.resolve(path) == loading.resolve(tiny_dir("qwen2"))
    base = model_of(tiny_dir("qwen2"))
    toks = tokens_of(12)
    assert not torch.allclose(model(toks, model.new_cache(16)), base(toks, base.new_cache(16)), atol=1e-2)


def test_a_broken_linearized_directory_is_refused_naming_what_is_missing(tmp_path, tiny_linear):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_linear("qwen2"), bad)
    (bad / "linear.safetensors").unlink()
    with pytest.raises(loading.ModelNotFoundError, match="linear.safetensors"):
        loading.resolve(str(bad))


def test_linearizing_twice_or_sliding_window_models_is_refused(tiny_dir, tiny_linear):
    with pytest.raises(ValueError, match="linearized already"):
        model_of(tiny_linear("qwen2")).linearize(LinearConfig())
    with pytest.raises(ValueError, match="sliding-window"):
        model_of(tiny_dir("gemma3")).linearize(LinearConfig())


def test_tidal_attention_is_refused_on_a_linearized_model(tiny_linear):
    from actors.tidal import TidalConfig

    with pytest.raises(ValueError, match="linearized"):
        ModelRunner(model_of(tiny_linear("qwen2")), 64, TidalConfig(4, (), (0,)))


# ---- verification equals decoding one token at a time ----------------------------------------
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_chain_verified_at_once_equals_decoding_it_token_by_token(tiny_linear, family):
    model = model_of(tiny_linear(family))
    toks = tokens_of(23)
    expected = one_by_one(model, toks)
    torch.testing.assert_close(model(toks, model.new_cache(32)), expected, **TOL)
    cache = model.new_cache(32)
    split = torch.cat([model(toks[a:b], cache) for a, b in ((0, 10), (10, 17), (17, 23))])
    torch.testing.assert_close(split, expected, **TOL)


def tree_case(model):
    """A committed prefix of 9 tokens (two whole groups and one slot), then a tree whose
    branches cross the next group boundary at different nodes."""
    toks = tokens_of(14)
    tree = TokenTree(torch.tensor([toks[9], toks[10], 5, toks[11], 7, toks[12], 9]),
                     torch.tensor([-1, 0, 0, 1, 2, 3, 4]))
    cache = model.new_cache(32)
    model(toks[:9], cache)
    return toks, tree, cache


def path_logits(model, prefix: torch.Tensor, path: list[int]) -> torch.Tensor:
    cache = model.new_cache(32)
    model(prefix, cache)
    return torch.cat([model(torch.tensor([t]), cache) for t in path])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_every_tree_node_gets_the_logits_of_its_own_path(tiny_linear, family):
    model = model_of(tiny_linear(family))
    toks, tree, cache = tree_case(model)
    got = model(tree.tokens, cache, positions=tree.positions(9), tree_mask=tree.attention_mask())
    for path in ([0, 1, 3, 5], [0, 2, 4, 6]):
        torch.testing.assert_close(got[path], path_logits(model, toks[:9], tree.tokens[path].tolist()), **TOL)


def test_sums_and_convolution_over_the_flattened_tree_mix_siblings(tiny_linear, monkeypatch):
    """The mutation the seed warns about: running the past sums and the convolution over the
    tree in flattened order. The second branch then sees the first and its logits change."""
    model = model_of(tiny_linear("qwen2"))
    original = lin.ancestry
    monkeypatch.setattr(lin, "ancestry", lambda start, lo, positions, mask: original(start, lo, positions, None))
    toks, tree, cache = tree_case(model)
    got = model(tree.tokens, cache, positions=tree.positions(9), tree_mask=tree.attention_mask())
    monkeypatch.undo()
    assert not torch.allclose(got[[0, 2, 4, 6]], path_logits(model, toks[:9], tree.tokens[[0, 2, 4, 6]].tolist()),
                              atol=1e-2)


# ---- the recurrent state under speculation -------------------------------------------------
def test_committing_a_path_then_decoding_on_equals_decoding_alone(tiny_linear):
    model = model_of(tiny_linear("qwen2"))
    toks, tree, cache = tree_case(model)
    model(tree.tokens, cache, positions=tree.positions(9), tree_mask=tree.attention_mask())
    cache.compact(9, [0, 1, 3, 5])  # accept toks[10..12]: the state is that node's
    rest = model(toks[13:], cache)
    torch.testing.assert_close(rest, one_by_one(model, toks)[13:], **TOL)


def test_rejected_drafts_cost_nothing_and_rollback_far_back_refolds(tiny_linear, monkeypatch):
    model = model_of(tiny_linear("qwen2"))
    toks = tokens_of(40)
    expected = one_by_one(model, toks)
    folds = []
    fold = lin.fold_group
    monkeypatch.setattr(lin, "fold_group", lambda *a: folds.append(1) or fold(*a))
    cache = model.new_cache(48)
    model(toks[:14], cache)  # groups [0,4) [4,8) are summed when the next forward starts
    model(tokens_of(5, seed=9), cache)  # drafts, rejected
    n = len(folds)
    cache.crop(14)
    assert len(folds) == n  # a rejection folds nothing, refolds nothing
    torch.testing.assert_close(model(toks[14:20], cache), expected[14:20], **TOL)
    cache.crop(2)  # back past every kept checkpoint: the state refolds from slot 0
    torch.testing.assert_close(model(toks[2:40], cache), expected[2:40], **TOL)
    assert set(cache.linear.points) <= set(range(0, 41, 4)) and len(cache.linear.points) <= LinearState.KEEP


def test_each_group_is_folded_once_whatever_the_verify_pattern(tiny_linear, monkeypatch):
    model = model_of(tiny_linear("qwen2"))
    calls = []
    fold = lin.fold_group
    monkeypatch.setattr(lin, "fold_group", lambda p, s, k, v: calls.append(k.shape[1]) or fold(p, s, k, v))
    cache = model.new_cache(64)
    toks = tokens_of(33)
    model(toks[:3], cache)
    for i in range(3, 33, 3):
        model(toks[i:i + 3], cache)
    n_layers = model.config.n_layers
    assert calls == [4] * (n_layers * (30 // 4))  # groups [0,4) .. [28,32): once each, per layer


def test_a_step_reads_a_bounded_window_whatever_the_context():
    cfg = LinearConfig(group=64, conv=4)
    for start in (100, 1000, 16000):
        step = lin.plan_step(cfg, start, torch.arange(start, start + 5), None)
        assert step.end - step.lo <= cfg.group - 1 + cfg.conv - 1 + 5
        assert step.local.shape == step.past.shape == (5, step.end - step.lo)


# ---- lossless speculation ----------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 3])
def test_greedy_speculation_with_a_linearized_target_or_draft_is_the_linearized_output(tiny_linear, tiny_dir, width):
    lin_target = runner(tiny_linear("qwen2"))
    lin_draft = runner(tiny_linear("qwen2", seed=1, noise=0.3))
    plain_draft = runner(tiny_dir("qwen2", noise=0.3))
    plain_target = runner(tiny_dir("qwen2"))
    for trial in range(3):
        prompt = tokens_of(9 + 7 * trial, seed=trial).tolist()
        cfg = DecodeConfig(max_new_tokens=30, tree_width=width, eos_token_ids=(-1,))
        expected = autoregressive_generate(lin_target, prompt, cfg).token_ids
        spec = speculative_generate(lin_target, plain_draft, prompt, cfg)
        assert spec.token_ids == expected, trial
        assert spec.stats.target_forwards < 30  # drafts were accepted: it really speculated
        plain = autoregressive_generate(plain_target, prompt, cfg).token_ids
        assert speculative_generate(plain_target, lin_draft, prompt, cfg).token_ids == plain, trial


# Two layers: with one, a tree verified over the flattened order (the mutation below) moves
# the distribution too little for the sampling test to see it.
TWO_LAYERS = MODEL | {"num_hidden_layers": 2}


@pytest.mark.parametrize("width", [1, 2])
def test_sampling_with_a_linearized_target_matches_its_distribution(tiny_linear, tiny_dir, width):
    target = runner(tiny_linear("qwen2", **TWO_LAYERS), 64)
    draft = runner(tiny_dir("qwen2", **TWO_LAYERS, noise=0.3), 64)
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params, LONG_PROMPT)
    assert chi2_pvalue(sample_sequences(target, draft, params, width=width, prompt=LONG_PROMPT), probs) > 1e-3


def test_a_tree_verify_over_the_flattened_order_is_caught_by_the_sampling_test(tiny_linear, tiny_dir, monkeypatch):
    target = runner(tiny_linear("qwen2", **TWO_LAYERS), 64)
    draft = runner(tiny_dir("qwen2", **TWO_LAYERS, noise=0.3), 64)
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params, LONG_PROMPT)
    original = lin.ancestry
    monkeypatch.setattr(lin, "ancestry", lambda start, lo, positions, mask: original(start, lo, positions, None))
    draw = lambda start, n: sample_sequences(target, draft, params, width=2, prompt=LONG_PROMPT, n=n, start=start)  # noqa: E731
    assert caught_pvalue(draw, probs) < 1e-6


def test_a_snapshot_keeps_the_state_and_decodes_as_a_fresh_prefill(tiny_linear, monkeypatch):
    target = runner(tiny_linear("qwen2"))
    prompt, cfg = tokens_of(70).tolist(), DecodeConfig(max_new_tokens=12, eos_token_ids=(-1,))
    fresh = autoregressive_generate(target, prompt, cfg).token_ids
    target.reset()
    target.prefill(prompt)
    snap = target.snapshot()
    folds = []
    fold = lin.fold_group
    monkeypatch.setattr(lin, "fold_group", lambda *a: folds.append(1) or fold(*a))
    for _ in range(2):
        target.restore(snap)
        assert autoregressive_generate(target, prompt, cfg).token_ids == fresh
    assert len(folds) == 2 * 3 * target.model.config.n_layers  # the 3 groups decoding adds, not the prompt's 17


def test_a_batched_forward_gives_each_sequence_its_own_state_and_logits(tiny_linear):
    """Prompts of different lengths prefilled together, then chains and a tree verified
    together: each sequence's folded sums and logits are those of running it alone."""
    from actors.attention_plan import BatchItem

    model = model_of(tiny_linear("qwen2"))
    prompts = [tokens_of(n, seed=n) for n in (5, 11, 18)]
    tree = TokenTree(torch.tensor([3, 9, 12, 7]), torch.tensor([-1, 0, 0, 1]))
    chain = torch.tensor([4, 6, 8])

    def verify(cache, n: int) -> BatchItem:  # the middle sequence verifies a tree, the others a chain
        if n == 11:
            return BatchItem(tree.tokens, cache, tree.positions(cache.length), tree.attention_mask())
        return BatchItem(chain, cache)

    alone, together = [model.new_cache(64) for _ in prompts], [model.new_cache(64) for _ in prompts]
    model.forward_batch([BatchItem(p, c, prefill=True) for p, c in zip(prompts, together)])
    expected = []
    for p, a, b in zip(prompts, alone, together):
        model.forward_hidden(p, a, prefill=True)
        assert b.length == a.length == len(p) and sorted(b.linear.points) == sorted(a.linear.points)
        for at in a.linear.points:
            for sa, sb in zip(a.linear.points[at], b.linear.points[at]):
                torch.testing.assert_close(sb, sa, **TOL)
        it = verify(a, len(p))
        expected.append(model.forward(it.tokens, a, it.positions, it.tree_mask))
    got = model.forward_batch([verify(c, len(p)) for p, c in zip(prompts, together)])
    for h, e in zip(got, expected):
        torch.testing.assert_close(model.logits(h), e, **TOL)
