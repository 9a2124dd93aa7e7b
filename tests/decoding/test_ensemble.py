"""Combine rules (parsing, the combined logits) and the CoS acceptance rule."""

from __future__ import annotations

import pytest
import torch

from decoding.ensemble import CombineRule, choose_gamma, combine_logits, cos_verify, expected_tokens, parse_combine


def test_parse_weighted_lambda_and_weights():
    assert parse_combine("we:0.5", 2).weights == (0.5, 0.5)
    assert parse_combine("we:0.25", 2).weights == (0.25, 0.75)
    assert parse_combine(" WE:1,1,2 ", 3).weights == (0.25, 0.25, 0.5)
    assert parse_combine("we:3,1", 2).weights == (0.75, 0.25)
    rule = parse_combine("cd:0.1", 2)
    assert (rule.kind, rule.mu) == ("cd", 0.1)
    assert rule.describe() == "cd:0.1" and parse_combine("we:0.5", 2).describe() == "we:0.5,0.5"


@pytest.mark.parametrize("text, n, words", [
    ("", 2, "bad combine rule"),
    ("mix:0.5", 2, "bad combine rule"),
    ("we", 2, "bad combine rule"),
    ("we:", 2, "bad combine rule"),
    ("we:abc", 2, "not a number"),
    ("we:1.5", 2, "in [0, 1]"),
    ("we:0.5", 3, "one weight per model"),
    ("we:1,2", 3, "2 weights for 3 models"),
    ("we:-1,2", 2, ">= 0"),
    ("we:0,0", 2, "not all 0"),
    ("we:nan", 2, "not finite"),
    ("cd:0.1", 3, "exactly 2 models"),
    ("cd:-1", 2, ">= 0"),
    ("cd:0.1,0.2", 2, "one number"),
    ("we:0.5", 1, "at least 2 models"),
])
def test_parse_errors_say_what_is_wrong(text, n, words):
    with pytest.raises(ValueError, match=None) as err:
        parse_combine(text, n)
    assert words in str(err.value), str(err.value)


def test_rule_validation():
    with pytest.raises(ValueError):
        CombineRule("we", weights=(1.0,))
    with pytest.raises(ValueError):
        CombineRule("cd", mu=float("inf"))
    with pytest.raises(ValueError):
        CombineRule("avg")


def test_weighted_combination_is_the_mixture():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 50, generator=gen), torch.randn(3, 50, generator=gen)
    mixed = combine_logits([a, b], parse_combine("we:0.3", 2))
    expected = 0.3 * torch.softmax(a, -1) + 0.7 * torch.softmax(b, -1)
    assert torch.allclose(torch.softmax(mixed, -1), expected, atol=1e-6)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(3), atol=1e-5)  # already normalised
    # weight 0 ignores that member entirely
    assert torch.allclose(combine_logits([a, b], parse_combine("we:1", 2)), torch.log_softmax(a, -1), atol=1e-6)


def test_contrastive_combination():
    gen = torch.Generator().manual_seed(1)
    expert, amateur = torch.randn(2, 30, generator=gen), torch.randn(2, 30, generator=gen)
    got = combine_logits([expert, amateur], parse_combine("cd:0.4", 2))
    want = torch.log_softmax(expert, -1) - 0.4 * torch.log_softmax(amateur, -1)
    assert torch.allclose(got, want, atol=1e-6)
    # shift-invariant in each member's logits, like the distributions they stand for
    again = combine_logits([expert + 3, amateur - 7], parse_combine("cd:0.4", 2))
    assert torch.allclose(torch.softmax(got, -1), torch.softmax(again, -1), atol=1e-6)


def test_combine_refuses_mismatched_members():
    with pytest.raises(ValueError, match="share a shape"):
        combine_logits([torch.zeros(5), torch.zeros(6)], parse_combine("we:0.5", 2))
    with pytest.raises(ValueError, match="combines 2 models, got 3"):
        combine_logits([torch.zeros(5)] * 3, parse_combine("we:0.5", 2))


def test_cos_verify_greedy():
    r = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.0, 1.0]])
    q = torch.full((3, 3), 1 / 3)
    assert cos_verify([1, 0, 2], q, r, greedy=True) == (3, None)
    assert cos_verify([1, 2, 2], q, r, greedy=True) == (1, 0)
    assert cos_verify([0, 0, 2], q, r, greedy=True) == (0, 1)


def test_cos_verify_sampling_single_position_follows_r():
    """One position, many trials: proposal from q, accept/residual -> exactly r."""
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    r = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(4)
    trials = 20_000
    for _ in range(trials):
        x = int(torch.multinomial(q, 1, generator=gen))
        n, corr = cos_verify([x], q[None], r[None], greedy=False, generator=gen)
        counts[x if n == 1 else corr] += 1
    assert torch.allclose(counts / trials, r, atol=0.015)


def test_cos_verify_refuses_a_token_q_cannot_draw():
    with pytest.raises(ValueError, match="probability 0"):
        cos_verify([1], torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), greedy=False)


def test_gamma_choice_follows_costs_and_acceptance():
    cheap_verify = lambda n: 0.1  # noqa: E731 - flat verify cost: long drafts pay
    k_hi, _ = choose_gamma(0.9, 0.01, cheap_verify, 12)
    k_lo, _ = choose_gamma(0.2, 0.01, cheap_verify, 12)
    assert k_hi > k_lo >= 1
    assert expected_tokens(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens(0.5, 1) == pytest.approx(0.5 + 0.5)
