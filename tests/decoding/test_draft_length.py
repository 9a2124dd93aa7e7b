from __future__ import annotations

import pytest

from decoding.draft_length import CostModel, DraftLengthPolicy


def policy(draft_s: float, verify: dict[int, float], **kw) -> DraftLengthPolicy:
    p = DraftLengthPolicy(**kw)
    p.costs.observe_draft(draft_s, 1)
    for k, s in verify.items():
        p.costs.observe_verify(s, k)
    return p


def drafted_until_stop(p: DraftLengthPolicy, step_conf: float) -> int:
    probs = []
    while True:
        probs.append(step_conf ** (len(probs) + 1))
        if not p.keep_drafting(len(probs), probs):
            return len(probs)


def test_fixed_length_is_exact():
    assert drafted_until_stop(DraftLengthPolicy(fixed=5), 0.01) == 5


def test_cheap_confident_draft_drafts_longer_than_expensive_unsure_one():
    flat = {k: 0.27 for k in range(1, 20)}
    cheap = drafted_until_stop(policy(0.02, flat), 0.9)
    dear = drafted_until_stop(policy(0.2, flat), 0.6)
    assert cheap > dear >= 1
    assert cheap <= DraftLengthPolicy().max_len


def test_costly_verification_shortens_drafts():
    flat = {k: 0.27 for k in range(1, 20)}
    steep = {k: 0.27 * k for k in range(1, 20)}
    assert drafted_until_stop(policy(0.05, steep), 0.85) < drafted_until_stop(policy(0.05, flat), 0.85)


def test_calibration_follows_observed_acceptance():
    p = DraftLengthPolicy()
    for _ in range(20):
        p.observe_acceptance(accepted=1, predicted=4.0)
    assert p.calibration < 0.4


def test_cost_model_interpolates():
    c = CostModel()
    c.observe_verify(1.0, 1)
    c.observe_verify(3.0, 5)
    assert c.verify(3) == pytest.approx(2.0)
    assert c.verify(9) == pytest.approx(5.0)  # beyond: along the slope of the last two sizes


def test_validation():
    with pytest.raises(ValueError, match="max_len"):
        DraftLengthPolicy(max_len=0)
    with pytest.raises(ValueError, match="fixed"):
        DraftLengthPolicy(fixed=0)


def test_verify_cost_beyond_the_measured_sizes_follows_their_slope():
    """A compute-bound (quantized) target: t_v grows with the tokens verified. Measured at
    1, 2 and 4 tokens only, the policy must not take 8 tokens to cost what 4 do."""
    costs = CostModel()
    for k, s in {1: 0.066, 2: 0.085, 4: 0.098}.items():
        costs.observe_verify(s, k)
    assert costs.verify(8) == pytest.approx(0.098 + 4 * (0.098 - 0.085) / 2)
    assert costs.verify(3) == pytest.approx((0.085 + 0.098) / 2)
    flat = CostModel()
    for k in (1, 2):
        flat.observe_verify(0.2, k)
    assert flat.verify(16) == 0.2  # memory-bound: flat stays flat
    steep = policy(0.037, {1: 0.066, 2: 0.085, 4: 0.098})
    steep.costs.observe_verify(0.139, 8)
    measured = policy(0.037, {1: 0.066, 2: 0.085, 4: 0.098, 8: 0.139, 16: 0.221})
    assert drafted_until_stop(steep, 0.95) == drafted_until_stop(measured, 0.95)
