"""Tests for decoding.sampling: SamplingParams, logits_to_probs, sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import chisquare

from decoding.sampling import SamplingParams, logits_to_probs, sample

PROPS = settings(max_examples=60, deadline=None, database=None)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


# ---- SamplingParams -----------------------------------------------------------------------


def test_defaults_are_greedy():
    p = SamplingParams()
    assert p.greedy and p.temperature == 0.0 and p.top_p == 1.0 and p.top_k == 0
    assert not SamplingParams(temperature=0.5).greedy


def test_numbers_are_normalised_and_frozen():
    p = SamplingParams(temperature=1, top_p=1)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p == SamplingParams(temperature=1.0)
    with pytest.raises(AttributeError):
        p.temperature = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1.0"),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("top_p", math.nan),
        ("top_p", None),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", True),
    ],
)
def test_params_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


# ---- logits_to_probs: hand-made cases -------------------------------------------------------


def test_greedy_is_one_hot_of_argmax_first_on_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 0.0], [-1.0, -2.0, -0.5]])
    probs = logits_to_probs(logits, SamplingParams(temperature=0.0, top_p=0.3, top_k=2))
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))


def test_greedy_keeps_batch_shape_and_low_precision_input():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)).bfloat16()
    probs = logits_to_probs(logits, SamplingParams())
    assert probs.shape == (2, 3, 50) and probs.dtype == torch.float32
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_temperature_scales_logits(temperature):
    # probs 1:2:4 at T=1, so at T the weights are (1, 2, 4) ** (1 / T).
    logits = logits_of([1 / 7, 2 / 7, 4 / 7])
    w = np.array([1.0, 2.0, 4.0]) ** (1 / temperature)
    probs = logits_to_probs(logits, SamplingParams(temperature=temperature))
    np.testing.assert_allclose(probs.numpy(), w / w.sum(), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30])
def test_a_tiny_temperature_is_the_greedy_limit_not_nan(temperature):
    """Every positive temperature is valid; dividing first sent all logits to +inf (NaN)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 2.0, float("-inf")]])
    p = logits_to_probs(logits, SamplingParams(temperature=temperature, top_p=0.9))
    assert torch.equal(p, torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]]))


def test_top_k_keeps_k_largest_renormalised():
    logits = torch.tensor([1.0, 4.0, 2.0, 3.0, 0.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert kept(probs) == {1, 3}
    e = math.exp(1.0)
    np.testing.assert_allclose(probs.numpy(), [0, e / (e + 1), 0, 1 / (e + 1), 0], rtol=1e-6)
    assert kept(logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3))) == {1, 2, 3}


def test_top_k_keeps_ties_with_kth_value():
    logits = torch.tensor([3.0, 1.0, 3.0, 3.0, 0.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert kept(probs) == {0, 2, 3}
    np.testing.assert_allclose(probs[[0, 2, 3]].numpy(), [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, 5, 6, 100])
def test_top_k_off_or_at_least_vocab_changes_nothing(top_k):
    logits = torch.tensor([1.0, 4.0, 2.0, 3.0, 0.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=top_k))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@pytest.mark.parametrize(
    "top_p,expected",
    [
        (5e-324, {0}),  # below float32's smallest value: still the top token (found by fuzzing the endpoint)
        (1e-9, {0}),
        (0.45, {0}),
        (0.6, {0, 2}),
        (0.85, {0, 2, 3}),  # mass before the 3rd token is 0.8 < 0.85
        (0.96, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_mass(top_p, expected):
    base = [0.5, 0.05, 0.3, 0.15]
    probs = logits_to_probs(logits_of(base), SamplingParams(temperature=1.0, top_p=top_p))
    assert kept(probs) == expected
    mass = sum(base[i] for i in expected)
    want = [base[i] / mass if i in expected else 0.0 for i in range(4)]
    np.testing.assert_allclose(probs.numpy(), want, rtol=1e-5, atol=1e-7)


def test_top_p_keeps_ties_with_last_kept_token():
    probs = logits_to_probs(logits_of([0.3, 0.1, 0.3, 0.3]), SamplingParams(1.0, top_p=0.1))
    assert kept(probs) == {0, 2, 3}


def test_top_k_applies_before_top_p():
    # After top_k=2 the renormalised masses are 4/7 and 3/7, so top_p=0.5 keeps only the
    # first; applying top_p on the full distribution first would keep two (0.4 < 0.5).
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.5, top_k=2))
    assert kept(probs) == {0}
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.65, top_k=2))
    assert kept(probs) == {0, 1}
    np.testing.assert_allclose(probs[:2].numpy(), [4 / 7, 3 / 7], rtol=1e-5)


def test_temperature_applies_before_top_p():
    # T=1: masses 0.6/0.3/0.1 -> top_p=0.65 keeps 2. T=0.25 sharpens the head to > 0.65.
    logits = logits_of([0.6, 0.3, 0.1])
    assert kept(logits_to_probs(logits, SamplingParams(1.0, top_p=0.65))) == {0, 1}
    assert kept(logits_to_probs(logits, SamplingParams(0.25, top_p=0.65))) == {0}


def test_input_logits_are_not_modified():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.5, top_k=7))
    logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.equal(logits, before)


def test_handles_minus_inf_logits():
    logits = torch.tensor([0.0, -math.inf, 1.0, -math.inf])
    probs = logits_to_probs(logits, SamplingParams(1.0, top_p=0.99, top_k=3))
    assert kept(probs) == {0, 2} and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)


def reference_kept(logits: np.ndarray, params: SamplingParams) -> set[int]:
    """Slow float64 reference: explicit sort and loop."""
    x = logits.astype(np.float64) / params.temperature
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if 0 < params.top_k < len(x):
        kth = x[order[params.top_k - 1]]
        order = [i for i in order if x[i] >= kth]
    w = np.exp(x[order] - x[order].max())
    w /= w.sum()
    cut, mass = 0, 0.0
    while cut < len(order):  # smallest prefix whose mass reaches top_p
        mass += w[cut]
        cut += 1
        if mass >= params.top_p:
            break
    last = x[order[cut - 1]]
    return {i for i in order if x[i] >= last}


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked: nucleus inside the probe; flat: full sort
@pytest.mark.parametrize("top_k", [0, 3000])
def test_large_vocab_matches_reference(scale, top_k):
    # V > 1024 exercises the topk probe and its fallback to a full sort.
    logits = torch.randn(2, 5000, generator=torch.Generator().manual_seed(2)) * scale
    params = SamplingParams(temperature=1.3, top_p=0.9, top_k=top_k)
    probs = logits_to_probs(logits, params)
    for row in range(2):
        assert kept(probs[row]) == reference_kept(logits[row].numpy(), params)
        assert math.isclose(float(probs[row].sum()), 1.0, rel_tol=1e-5)


def test_shape_validation():
    with pytest.raises(ValueError, match="logits"):
        logits_to_probs(torch.tensor(1.0), SamplingParams(1.0))
    with pytest.raises(ValueError, match="logits"):
        logits_to_probs(torch.zeros(3, 0), SamplingParams(1.0))


# ---- logits_to_probs: properties -------------------------------------------------------------

logit_rows = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 3), st.integers(1, 40)),
    elements=st.floats(-30, 30, width=32),
)
sampling_params = st.builds(
    SamplingParams,
    temperature=st.floats(0.05, 5.0),
    top_p=st.one_of(st.floats(0.01, 1.0), st.floats(0.0, 1e-30, exclude_min=True)),
    top_k=st.integers(0, 45),
)


@PROPS
@given(logit_rows, sampling_params)
# subnormal logits that tie once divided by the temperature (found by hypothesis)
@example(np.array([[1e-45, 0.0]], np.float32), SamplingParams(temperature=2.0, top_p=1.0, top_k=1))
@example(np.array([[-1e-45, 0.0, 0.0]], np.float32), SamplingParams(temperature=2.0, top_p=0.5, top_k=0))
def test_property_rows_are_renormalised_prefixes(logits_np, params):
    logits = torch.from_numpy(logits_np)
    probs = logits_to_probs(logits, params)
    assert probs.shape == logits.shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(logits.shape[0]), rtol=0, atol=1e-5)
    tempered = torch.softmax(logits.double() / params.temperature, -1)
    for row in range(logits.shape[0]):
        # Order and ties as the sampler sees them: tempered in float32, where two distinct
        # subnormal logits (1e-45 and 0) can become equal.
        x, keep = logits[row] / params.temperature, probs[row] > 0
        assert keep.any()
        # A prefix of the sorted order: every kept logit >= every dropped one.
        if not keep.all():
            assert x[keep].min() >= x[~keep].max()
        # Kept tokens keep their relative weights.
        ref = tempered[row][keep] / tempered[row][keep].sum()
        torch.testing.assert_close(probs[row][keep].double(), ref, rtol=1e-4, atol=1e-6)
        if params.top_k:
            # Within the top k, except for ties with the k-th largest value.
            kth = x.sort(descending=True).values[min(params.top_k, x.numel()) - 1]
            assert bool((x[keep] >= kth).all())
        if params.top_p < 1.0:
            # Reaches top_p of the (top-k filtered) mass, and is minimal: without the
            # smallest kept value (and its ties) it would fall short.
            cand = tempered[row].clone()
            if params.top_k:
                cand[x < kth] = 0
            cand /= cand.sum()
            assert float(cand[keep].sum()) >= params.top_p - 1e-5
            inner = keep & (x > x[keep].min())
            assert float(cand[inner].sum()) < params.top_p + 1e-5


@PROPS
@given(logit_rows, st.floats(0.05, 5.0))
def test_property_no_top_p_no_top_k_is_just_temperature(logits_np, temperature):
    logits = torch.from_numpy(logits_np)
    probs = logits_to_probs(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, -1), rtol=1e-5, atol=1e-7)


@PROPS
@given(logit_rows, sampling_params)
def test_property_greedy_matches_argmax(logits_np, params):
    logits = torch.from_numpy(logits_np)
    greedy = SamplingParams(temperature=0.0, top_p=params.top_p, top_k=params.top_k)
    probs = logits_to_probs(logits, greedy)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(logits.shape[0]))


# ---- sample ---------------------------------------------------------------------------------


def test_sample_shapes_and_determinism():
    probs = torch.softmax(torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(3)), -1)
    a = sample(probs, torch.Generator().manual_seed(7))
    b = sample(probs, torch.Generator().manual_seed(7))
    assert a.shape == (2, 3) and a.dtype == torch.long and torch.equal(a, b)
    assert sample(probs[0, 0]).shape == ()


def test_sample_uses_one_float64_uniform_per_row():
    # The documented stream: u = rand(rows, float64); token = first index with cdf > u.
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    tokens = sample(probs, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    u = torch.rand(3, 1, dtype=torch.float64, generator=g)
    cdf = probs.double().cumsum(-1)
    assert torch.equal(tokens, (cdf <= u).sum(-1))
    # And nothing else was consumed: the next draw continues the same stream.
    g2 = torch.Generator().manual_seed(11)
    sample(probs, g2)
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=g))


def test_sample_matches_distribution_and_test_has_power():
    probs = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
    n = 20_000
    draws = sample(probs.expand(n, -1), torch.Generator().manual_seed(5))
    counts = np.bincount(draws.numpy(), minlength=6)
    assert counts[1] == 0 and counts[4] == 0
    keep = probs.numpy() > 0
    assert chisquare(counts[keep], probs.numpy()[keep] * n).pvalue > 1e-3
    wrong = np.array([0.07, 0.38, 0.25, 0.3])
    assert chisquare(counts[keep], wrong * n).pvalue < 1e-6


def test_sample_accepts_unnormalised_weights():
    weights = torch.tensor([0.0, 2.0, 0.0, 6.0])
    draws = sample(weights.expand(4000, -1), torch.Generator().manual_seed(0))
    frac = float((draws == 3).float().mean())
    assert set(draws.unique().tolist()) == {1, 3} and abs(frac - 0.75) < 0.03


@pytest.mark.parametrize("u,expected", [(0.0, 2), (1.0, 3)])
def test_sample_extreme_uniforms_stay_on_support(monkeypatch, u, expected):
    # u = 0 must skip leading zero-weight tokens; u * total rounding up to total (emulated
    # by u = 1) must not run past the end or land on trailing zeros.
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full(a[0], u, dtype=k["dtype"]))
    assert int(sample(torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0]))) == expected


weight_values = st.sampled_from([0.0, 0.0, 1e-30, 1e-6, 0.3, 1.0, 5.0])


@PROPS
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 30)), elements=weight_values),
    st.integers(0, 2**31),
)
def test_property_sample_never_draws_zero_weight(weights_np, seed):
    weights = torch.from_numpy(weights_np)
    weights[:, -1] += 1.0  # every row needs some mass
    batch = weights.expand(50, *weights.shape)
    draws = sample(batch, torch.Generator().manual_seed(seed))
    assert draws.shape == (50, weights.shape[0])
    assert bool((batch.gather(-1, draws.unsqueeze(-1)) > 0).all())


@pytest.mark.parametrize(
    "bad", [torch.zeros(4), torch.tensor([0.5, math.nan]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])]
)
def test_sample_rejects_rows_without_mass(bad):
    with pytest.raises(ValueError, match="mass"):
        sample(bad)


def test_sample_shape_validation():
    with pytest.raises(ValueError, match="probs"):
        sample(torch.tensor(1.0))
