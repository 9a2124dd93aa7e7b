"""The target's log-probabilities of committed tokens, as OpenAI's `logprobs` reports them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the target's top alternatives, most likely first


def logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Log-softmax of the target's raw logits; row i gives token i."""
    lp = torch.log_softmax(logits[:len(tokens)].float(), dim=-1)
    out = []
    for i, t in enumerate(tokens):
        alts = []
        if top:
            values, ids = lp[i].topk(top)
            alts = list(zip(ids.tolist(), values.tolist()))
        out.append(TokenLogprob(t, float(lp[i, t]), alts))
    return out
