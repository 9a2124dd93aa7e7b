"""How many tokens to draft: stop when the next one is not worth its cost.

Speculation pays when the tokens it expects to gain per second beat the target alone.
With draft step cost t_d, verify cost t_v(k) for k tokens, and the probability P_j that
the first j drafts are all accepted, a round that drafts j tokens yields 1 + sum(P_1..P_j)
tokens in j * t_d + t_v(j + 1) seconds. Drafting one more token adds P_{j+1} expected
tokens for t_d + t_v(j + 2) - t_v(j + 1) seconds; it is worth it while that ratio beats
the round's current rate. P_j is estimated from the draft's own confidence (the product
of its top-token probabilities), scaled by a running calibration factor, because small
drafts are over-confident. Costs are measured, not assumed: the CPU and GPU shapes of
t_v(k) differ wildly (see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CostModel:
    """Exponential moving averages of measured draft-step and verify costs, in seconds."""

    smoothing: float = 0.3
    draft_step_s: float | None = None
    verify_s: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")

    def observe_draft(self, seconds: float, steps: int) -> None:
        if steps > 0:
            self.draft_step_s = self._ema(self.draft_step_s, seconds / steps)

    def observe_verify(self, seconds: float, tokens: int) -> None:
        self.verify_s[tokens] = self._ema(self.verify_s.get(tokens), seconds)

    def verify(self, tokens: int) -> float:
        """t_v(tokens), interpolated between measured sizes. Beyond the largest, extended
        along the slope of the last two (never down): a 4-bit target is compute-bound past
        ~2 tokens, so assuming a flat cost there would draft far too much."""
        if tokens in self.verify_s:
            return self.verify_s[tokens]
        if not self.verify_s:
            return 1.0
        sizes = sorted(self.verify_s)
        below = [k for k in sizes if k < tokens]
        above = [k for k in sizes if k > tokens]
        if below and above:
            lo, hi = below[-1], above[0]
            w = (tokens - lo) / (hi - lo)
            return (1 - w) * self.verify_s[lo] + w * self.verify_s[hi]
        if above:
            return self.verify_s[above[0]]
        last = self.verify_s[below[-1]]
        if len(below) < 2:
            return last
        prev = self.verify_s[below[-2]]
        slope = max(0.0, (last - prev) / (below[-1] - below[-2]))
        return last + slope * (tokens - below[-1])

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new


@dataclass
class DraftLengthPolicy:
    """Decides, after each drafted token, whether to draft another.

    `fixed` drafts exactly that many tokens (within `max_len`). Otherwise the choice is
    adaptive, from measured costs and the draft's calibrated confidence.
    """

    max_len: int = 12
    fixed: int | None = None
    tokens_per_node: int = 1  # verify tokens added per drafted depth (tree width)
    costs: CostModel = field(default_factory=CostModel)
    calibration: float = 1.0  # accepted / predicted, smoothed
    min_confidence: float = 0.05

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.fixed is not None and not 1 <= self.fixed:
            raise ValueError(f"fixed draft length must be >= 1, got {self.fixed}")

    def keep_drafting(self, drafted: int, accept_probs: list[float]) -> bool:
        """accept_probs[j] = estimated P(first j+1 drafts all accepted), for j < drafted."""
        if drafted >= self.max_len:
            return False
        if self.fixed is not None:
            return drafted < self.fixed
        if self.costs.draft_step_s is None or not self.costs.verify_s:
            return drafted < 4  # no measurements yet: a middle-of-the-road start
        # The next draft's acceptance is unknown until drafted; the last step's is the best guess.
        if not accept_probs:
            return True
        last_step = accept_probs[-1] / accept_probs[-2] if len(accept_probs) > 1 else accept_probs[-1]
        p_next = accept_probs[-1] * last_step * self.calibration
        if p_next < self.min_confidence:
            return False
        expected = 1 + self.calibration * sum(accept_probs)
        width = self.tokens_per_node
        cost = drafted * self.costs.draft_step_s + self.costs.verify(1 + drafted * width)
        extra_cost = self.costs.draft_step_s + self.costs.verify(1 + (drafted + 1) * width) - self.costs.verify(
            1 + drafted * width
        )
        return p_next * cost > expected * extra_cost

    def observe_acceptance(self, accepted: int, predicted: float) -> None:
        """Calibrate confidence: how many drafts the target accepted vs how many we predicted."""
        if predicted > 0:
            ratio = min(2.0, max(0.05, accepted / predicted))
            self.calibration = 0.8 * self.calibration + 0.2 * ratio
