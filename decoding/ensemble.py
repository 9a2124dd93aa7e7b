"""Combined distributions of model ensembles, and the CoS acceptance rule. Tensors in, out.

An ensemble of n models that share a vocabulary decodes from one combined distribution r,
built from every member's logits at the same position:

- weighted ensemble `we`: r = sum_i w_i softmax(l_i). As logits: log(sum_i w_i softmax(l_i)).
- contrastive decoding `cd`: r = softmax(log_softmax(l_expert) - mu * log_softmax(l_amateur)).

The request's SamplingParams (temperature, top-k, top-p) are then applied to the combined
logits with `logits_to_probs`, exactly as to a single target's; T = 0 is the argmax of the
combined logits. (So at T = 1 a weighted ensemble samples from the mixture itself.)

CoS (collaborative decoding via speculation, arXiv 2502.01662) proposes tokens from one
member's own distribution q and accepts each with min(1, r(x)/q(x)), else samples
norm(max(0, r - q)): speculative sampling with r as the target, so the output follows r
whatever q is (`cos_verify`). The decode loops live in `actors.ensemble`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

import decoding.acceptance as acceptance  # looked up at call time: tests monkeypatch it
from decoding.sampling import sample

__all__ = ["CombineRule", "parse_combine", "combine_logits", "cos_verify", "choose_gamma", "expected_tokens"]

KINDS = ("we", "cd")
COMBINE_HELP = ("we:LAMBDA (two models: weight LAMBDA on the first, 1-LAMBDA on the second), "
                "we:W1,W2,... (one weight per model, normalised), or cd:MU (two models: expert first, "
                "amateur second)")


@dataclass(frozen=True)
class CombineRule:
    """How member logits combine. `weights`: one per member, summing to 1 (we). `mu`: the
    amateur's penalty (cd; member 0 is the expert, member 1 the amateur)."""

    kind: str
    weights: tuple[float, ...] = ()
    mu: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"combine kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "we":
            w = tuple(float(x) for x in self.weights)
            if len(w) < 2:
                raise ValueError(f"a weighted ensemble needs a weight per model (>= 2), got {len(w)}")
            if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"ensemble weights must be finite, >= 0 and not all 0, got {w}")
            object.__setattr__(self, "weights", tuple(x / sum(w) for x in w))
        else:
            if not (isinstance(self.mu, (int, float)) and not isinstance(self.mu, bool)
                    and math.isfinite(self.mu) and self.mu >= 0):
                raise ValueError(f"contrastive mu must be a finite number >= 0, got {self.mu!r}")
            object.__setattr__(self, "mu", float(self.mu))

    @property
    def n_models(self) -> int:
        return len(self.weights) if self.kind == "we" else 2

    def describe(self) -> str:
        if self.kind == "we":
            return "we:" + ",".join(f"{w:g}" for w in self.weights)
        return f"cd:{self.mu:g}"


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number; expected {COMBINE_HELP}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not finite")
    return value


def parse_combine(text: str, n_models: int) -> CombineRule:
    """'we:0.5' | 'we:0.2,0.3,0.5' | 'cd:0.1' for an ensemble of `n_models` -> CombineRule."""
    if n_models < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {n_models}")
    kind, sep, rest = (text or "").strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not rest.strip():
        raise ValueError(f"bad combine rule {text!r}; expected {COMBINE_HELP}")
    parts = [p.strip() for p in rest.split(",")]
    if kind == "cd":
        if n_models != 2:
            raise ValueError(f"cd:MU (contrastive decoding) takes exactly 2 models, expert first and amateur "
                             f"second; got {n_models}")
        if len(parts) != 1:
            raise ValueError(f"cd takes one number (MU), got {rest!r}")
        mu = _number(parts[0], "cd MU")
        if mu < 0:
            raise ValueError(f"cd MU must be >= 0, got {mu:g}")
        return CombineRule("cd", mu=mu)
    values = [_number(p, "we weight") for p in parts]
    if len(values) == 1:
        lam = values[0]
        if n_models != 2:
            raise ValueError(f"we:LAMBDA is for 2 models; give one weight per model for {n_models} "
                             f"(e.g. we:{','.join(['1'] * n_models)})")
        if not 0 <= lam <= 1:
            raise ValueError(f"we LAMBDA must be in [0, 1], got {lam:g}")
        values = [lam, 1 - lam]
    if len(values) != n_models:
        raise ValueError(f"we has {len(values)} weights for {n_models} models; give one weight per model")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"we weights must be >= 0 and not all 0, got {values}")
    return CombineRule("we", weights=tuple(values))


def combine_logits(logits: Sequence[Tensor], rule: CombineRule) -> Tensor:
    """Member logits, each [..., V] (same shape) -> combined logits [..., V], float32."""
    if len(logits) != rule.n_models:
        raise ValueError(f"{rule.describe()} combines {rule.n_models} models, got {len(logits)} logits")
    shapes = {tuple(t.shape) for t in logits}
    if len(shapes) != 1:
        raise ValueError(f"member logits must share a shape (same vocabulary), got {sorted(shapes)}")
    if rule.kind == "cd":
        expert, amateur = (torch.log_softmax(t.float(), dim=-1) for t in logits)
        return expert - rule.mu * amateur
    mix = None
    for w, t in zip(rule.weights, logits):
        if w == 0:
            continue
        part = torch.softmax(t.float(), dim=-1) * w
        mix = part if mix is None else mix.add_(part)
    return torch.log(mix)


def cos_verify(tokens: Sequence[int], q_rows: Tensor, r_rows: Tensor, greedy: bool,
               generator: torch.Generator | None = None) -> tuple[int, int | None]:
    """Test proposals `tokens` [K] drawn from `q_rows` [K, V] against the combined `r_rows`
    [K, V] -> (n_accepted, correction). correction is None when all K pass (the caller
    then has no r row for the next position: that is where CoS swaps roles).

    Sampling: K float64 uniforms up front, then one `sample` call on the first rejection,
    from norm(max(0, r - q)). Greedy: r and q are ignored but for their argmax: accept
    while the token is argmax r; the correction is argmax r.
    """
    k = len(tokens)
    if q_rows.shape[0] != k or r_rows.shape[0] != k:
        raise ValueError(f"need {k} q and r rows, got {q_rows.shape[0]} and {r_rows.shape[0]}")
    if k == 0:
        return 0, None
    x = torch.tensor(list(tokens), dtype=torch.long)
    rows = torch.arange(k)
    if greedy:
        best = r_rows.argmax(dim=-1)
        match = (best == x).to(torch.int32)
        n = int(match.cumprod(dim=0).sum())
        return (n, None) if n == k else (n, int(best[n]))
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(k, dtype=torch.float64, generator=generator, device=device)
    q_x, r_x = q_rows[rows, x], r_rows[rows, x]
    if bool((q_x <= 0).any()):
        raise ValueError("a proposed token has probability 0 under its own q: it was not drawn from it")
    accept = u < acceptance.acceptance_probability(r_x, q_x)
    n = int(accept.to(torch.int32).cumprod(dim=0).sum())
    if n == k:
        return n, None
    return n, int(sample(acceptance.residual_distribution(r_rows[n], q_rows[n]), generator))


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens a CoS round of k proposals commits, with per-token acceptance alpha:
    the accepted prefix plus the correction (an all-accepted round commits k)."""
    alpha = min(max(alpha, 0.0), 0.999)
    accepted = sum(alpha**j for j in range(1, k + 1))  # E[accepted prefix] = sum P(first j pass)
    return accepted + (1 - alpha**k)


def choose_gamma(alpha: float, draft_step_s: float, verify_s, max_len: int) -> tuple[int, float]:
    """The draft length k in 1..max_len with the best expected tokens per second, and that
    rate. `verify_s(n)`: measured seconds for the verifiers to score n tokens in parallel."""
    best_k, best_rate = 1, -1.0
    for k in range(1, max_len + 1):
        rate = expected_tokens(alpha, k) / (k * draft_step_s + verify_s(k + 1))
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate
