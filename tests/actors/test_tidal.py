"""TidalDecode sparse attention: exact where it must be, lossless where it drafts.

Sparse attention itself is an approximation; what must hold: a budget covering the
cache changes nothing, the sparse kernels equal full attention when nothing is left out,
the selection keeps the positions the selection layer weighted most, and speculation with
a sparse drafter (a draft model, or the target drafting for itself) gives the target's
own output, greedy and sampled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors import loading
from actors.runner import ModelRunner
from actors.tidal import SparseStep, TidalConfig, attend_select, attend_sparse, check_spec
from cluster.local import DecodeConfig, autoregressive_generate, speculative_generate
from decoding.draft_length import DraftLengthPolicy
from decoding.sampling import SamplingParams

from sampling_check import LONG_PROMPT, caught_pvalue, chi2_pvalue, exact_sequence_probs, sample_sequences


def runner(path: str, attention: TidalConfig | None = None, max_len: int = 256) -> ModelRunner:
    return ModelRunner(loading.load(path, "float32", progress=False).build(), max_len, attention)


def prompt_of(n: int, vocab: int = 64, seed: int = 3) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- layout and input checks ---------------------------------------------------------
def test_layout_scales_the_papers_to_the_model_depth():
    assert TidalConfig.for_model(32) == TidalConfig(256, (0, 1), (2, 13))
    qwen15 = TidalConfig.parse("tidal:512", 28)
    assert (qwen15.budget, qwen15.full_layers, qwen15.select_layers) == (512, (0, 1), (2, 8))  # measured
    roles = [qwen15.role(i) for i in range(28)]
    assert roles[:4] == ["full", "full", "select", "sparse"] and roles[8] == "select" and roles[27] == "sparse"
    assert TidalConfig.for_model(40).select_layers == (2, 16)  # no measurement for 40 layers: the paper's rule
    assert TidalConfig.parse("tidal", 2).select_layers == (0,)
    custom = TidalConfig.parse("tidal:64:3,9", 28)
    assert (custom.budget, custom.full_layers, custom.select_layers) == (64, (0, 1, 2), (3, 9))
    with pytest.raises(ValueError, match="past this model's 8 layers"):
        TidalConfig.parse("tidal:64:3,9", 8)


@pytest.mark.parametrize("spec", ["tidal:0", "tidal:x", "quest", "tidal:-3", "tidal:", "tidal:8:5,2", "tidal:8:a"])
def test_bad_specs_are_refused_by_name(spec):
    with pytest.raises(ValueError, match="tidal|attention"):
        check_spec(spec)


def test_sliding_window_models_are_refused_before_decoding(tiny_dir):
    with pytest.raises(ValueError, match="sliding-window"):
        runner(tiny_dir("gemma3"), TidalConfig(4, (0,), (1,)))


# ---- the kernels -------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 3])
def test_sparse_kernels_equal_full_attention_when_everything_is_selected(T):
    g, n_kv, D, start = 3, 2, 16, 40
    gen = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(n_kv, 64, D, generator=gen), torch.randn(n_kv, 64, D, generator=gen)
    q = torch.randn(n_kv, g * T, D, generator=gen)
    new = torch.ones(T, T, dtype=torch.bool).tril()
    mask = torch.cat((torch.ones(T, start, dtype=torch.bool), new), 1).repeat(g, 1)
    full = F.scaled_dot_product_attention(q[None], kc[None, :, :start + T], vc[None, :, :start + T],
                                          attn_mask=mask, scale=0.25)[0]
    step = SparseStep(TidalConfig(budget=start), start, new.repeat(g, 1) if T > 1 else None)
    torch.testing.assert_close(attend_select(q, kc, vc, start + T, step, 0.25), full, rtol=1e-5, atol=1e-5)
    assert step.selected.tolist() == [list(range(start))] * n_kv
    torch.testing.assert_close(attend_sparse(q, kc, vc, start + T, step, 0.25), full, rtol=1e-5, atol=1e-5)


def test_selection_keeps_the_most_weighted_positions_per_kv_head():
    g, n_kv, D, start, budget = 2, 2, 8, 30, 5
    gen = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(n_kv, 40, D, generator=gen), torch.randn(n_kv, 40, D, generator=gen)
    q = torch.randn(n_kv, g, D, generator=gen)
    step = SparseStep(TidalConfig(budget=budget), start, None)
    attend_select(q, kc, vc, start + 1, step, 1.0)
    weights = torch.softmax(q @ kc[:, :start + 1].transpose(1, 2), -1)[:, :, :start].sum(1)
    for h in range(n_kv):
        assert set(step.selected[h].tolist()) == set(weights[h].topk(budget).indices.tolist())
    assert step.selected.shape == (n_kv, budget) and bool((step.selected.diff(dim=-1) > 0).all())


# ---- the model -----------------------------------------------------------------------
def test_a_budget_covering_the_cache_is_full_attention_exactly(tiny_dir):
    r = runner(tiny_dir("qwen2"))
    prompt = prompt_of(50)
    r.feed(prompt)
    full = r.model(torch.tensor([7, 8]), r.cache)
    r.cache.crop(50)
    same = r.model(torch.tensor([7, 8]), r.cache, sparse=TidalConfig(50, (0,), (1,)))
    assert torch.equal(full, same)
    r.cache.crop(50)
    sparse = r.model(torch.tensor([7, 8]), r.cache, sparse=TidalConfig(4, (), (0,)))
    assert not torch.allclose(full, sparse)  # below the cache length it really is sparse


def test_chunked_prefill_equals_one_shot_prefill(tiny_dir):
    one, chunked = runner(tiny_dir("llama")), runner(tiny_dir("llama"))
    chunked.prefill_chunk = 7
    prompt = prompt_of(100)
    h1, l1 = one.prefill(prompt)
    h2, l2 = chunked.prefill(prompt)
    # fp32; the chunks' matmuls sum in another order than the whole prompt's (1e-5 relative)
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h2, h1, rtol=1e-4, atol=1e-4)
    n = one.cache.length
    assert chunked.cache.length == n == 100 and chunked.tokens == one.tokens == prompt
    torch.testing.assert_close(chunked.cache.k[..., :n, :], one.cache.k[..., :n, :], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.cache.v[..., :n, :], one.cache.v[..., :n, :], rtol=1e-4, atol=1e-4)


def test_a_snapshot_decodes_as_a_fresh_prefill(tiny_dir):
    target = runner(tiny_dir("qwen2"))
    prompt, cfg = prompt_of(40), DecodeConfig(max_new_tokens=12, eos_token_ids=(-1,))
    fresh = autoregressive_generate(target, prompt, cfg).token_ids
    target.reset()
    target.prefill(prompt)
    snap = target.snapshot()
    for _ in range(2):
        target.restore(snap)
        assert autoregressive_generate(target, prompt, cfg).token_ids == fresh


# ---- lossless speculation with sparse drafters ---------------------------------------
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("width", [1, 3])
def test_greedy_with_a_sparse_draft_and_self_drafting_is_the_targets_output(tiny_dir, family, width):
    tidal = TidalConfig(8, (), (0,))  # the tiny models have 2 layers: select, then sparse
    target = runner(tiny_dir(family))
    draft = runner(tiny_dir(family, noise=0.3), tidal)
    for trial in range(3):
        prompt = prompt_of(60 + 7 * trial, seed=trial)
        cfg = DecodeConfig(max_new_tokens=40, tree_width=width, eos_token_ids=(-1,))
        expected = autoregressive_generate(target, prompt, cfg).token_ids
        assert speculative_generate(target, draft, prompt, cfg).token_ids == expected, trial
        policy = DraftLengthPolicy(fixed=4, tokens_per_node=width)
        selfspec = speculative_generate(target, target, prompt, cfg, policy, self_draft=tidal)
        assert selfspec.token_ids == expected, trial
        assert selfspec.stats.accepted_tokens > 0  # the target's sparse self agrees often: it really drafts


def test_the_target_attending_sparsely_is_not_the_target(tiny_dir):
    """Use 3 (approximate): control that the budget used above really changes the output."""
    target = runner(tiny_dir("qwen2"))
    prompt, cfg = prompt_of(60), DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
    expected = autoregressive_generate(target, prompt, cfg).token_ids
    target.attention = TidalConfig(2, (), (0,))
    assert target.approximate and autoregressive_generate(target, prompt, cfg).token_ids != expected


def test_self_drafting_refuses_a_sparse_verifier(tiny_dir):
    target = runner(tiny_dir("qwen2"), TidalConfig(8, (0,), (1,)))
    with pytest.raises(ValueError, match="full attention"):
        speculative_generate(target, target, [1, 2], DecodeConfig(max_new_tokens=2), self_draft=TidalConfig(8))


SPARSE = TidalConfig(3, (), (0,))  # layer 0 selects, layer 1 attends sparsely


@pytest.mark.parametrize("use", ["draft", "self"])
def test_sampling_with_sparse_drafting_matches_the_target(tiny_dir, use):
    from sampling_check import runners

    target, draft = runners(tiny_dir, layers=2)  # layer 0 selects, layer 1 reads sparsely
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params, LONG_PROMPT)
    if use == "draft":
        draft.attention = SPARSE
        samples = sample_sequences(target, draft, params, prompt=LONG_PROMPT)
    else:
        samples = sample_sequences(target, target, params, prompt=LONG_PROMPT, self_draft=SPARSE)
    assert chi2_pvalue(samples, probs) > 1e-3


def test_a_sparse_verify_is_caught_by_the_sampling_test(tiny_dir):
    """Power check: had the sparse attention leaked into the verify (the target attending
    sparsely), the distribution would be the sparse model's, and the test must see it."""
    from sampling_check import runners

    target, draft = runners(tiny_dir, layers=2)  # layer 0 selects, layer 1 reads sparsely
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params, LONG_PROMPT)
    target.attention = TidalConfig(1, (), (0,))
    draw = lambda start, n: sample_sequences(target, draft, params, prompt=LONG_PROMPT, n=n, start=start)  # noqa: E731
    assert caught_pvalue(draw, probs) < 1e-6


def test_a_chunked_prefill_on_a_row_exact_quantized_target_keeps_speculation_identical(tmp_path, tiny_dir):
    """Quantized targets verify row by row (so a verify equals decoding steps); a prompt's
    chunks attend as one batch instead (nothing is verified against them), and every method
    decodes from that same prefill: greedy output stays the target's."""
    import tiny

    path = tiny.make_tiny_gguf(tmp_path / "q8", "qwen2", "Q8_0", "Q8_0")
    target = ModelRunner(loading.load(str(path), "gguf", progress=False).build(), 256)
    assert target.model.row_exact
    target.prefill_chunk = 32
    draft = runner(tiny_dir("qwen2", noise=0.3), TidalConfig(8, (), (0,)))
    prompt, cfg = prompt_of(150), DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,))
    expected = autoregressive_generate(target, prompt, cfg).token_ids
    assert speculative_generate(target, draft, prompt, cfg).token_ids == expected
    selfspec = speculative_generate(target, target, prompt, cfg, DraftLengthPolicy(fixed=3),
                                    self_draft=TidalConfig(8, (), (0,)))
    assert selfspec.token_ids == expected


def test_a_batched_sparse_step_gives_each_sequence_its_own_selection(tiny_dir):
    """Sequences past the budget and one within it (read whole), stepped in one forward,
    each sparse over its own cache: the logits of stepping each alone."""
    from actors.attention_plan import BatchItem

    model = runner(tiny_dir("qwen2")).model
    sparse = TidalConfig(8, (), (0,))
    prompts = [prompt_of(n, seed=n) for n in (40, 6, 90)]
    caches = [model.new_cache(128) for _ in prompts]
    for p, c in zip(prompts, caches):
        model.forward_hidden(torch.tensor(p), c, prefill=True)
    steps = [torch.tensor([5]), torch.tensor([7, 9]), torch.tensor([11])]
    expected = []
    for s, c in zip(steps, caches):
        expected.append(model(s, c, sparse=sparse))
        c.crop(c.length - len(s))
    got = model.forward_batch([BatchItem(s, c, sparse=sparse) for s, c in zip(steps, caches)])
    for h, e in zip(got, expected):
        torch.testing.assert_close(model.logits(h), e, rtol=1e-4, atol=1e-4)
    for s, c in zip(steps, caches):
        c.crop(c.length - len(s))
    dense = model.forward_batch([BatchItem(s, c) for s, c in zip(steps, caches)])
    assert not torch.allclose(model.logits(dense[0]), expected[0])  # past the budget it really was sparse
