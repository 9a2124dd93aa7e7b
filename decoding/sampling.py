"""Sampling transforms: logits -> probabilities under SamplingParams, and drawing tokens.

Speculative sampling is lossless with respect to the distribution it is given, so the
sampling transform (temperature, top-k, top-p) has to be part of that distribution: the
same `logits_to_probs` is applied to the target's logits (p) and to the draft's (q), and
acceptance then reproduces p exactly.

Everything here works on the last dimension of an arbitrary [..., V] tensor and runs once
per decoding step on rows of ~152k entries on a CPU, so it stays vectorised: no Python
loops over the vocabulary, no sort unless top-p needs one, and greedy never calls softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingParams", "logits_to_probs", "sample"]


def _is_number(x: object) -> bool:
    # bool is an int subclass; True as a temperature is a bug, not 1.0.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from a row of logits.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_p: nucleus mass in (0, 1]; 1 means off.
    top_k: keep the k largest logits (ties with the k-th are kept too); 0 means off.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not _is_number(p) or not (0.0 < p <= 1.0):  # also rejects NaN
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        k = self.top_k
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {k!r}")
        # Normalise numeric types so equal params compare and serialise equally.
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_vocab_dim(name: str, t: Tensor) -> None:
    if t.dim() == 0 or t.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(t.shape)}")


# How many of the largest logits top-p looks at before falling back to a full sort.
_NUCLEUS_PROBE = 1024


def _nucleus_size(sorted_x: Tensor, lse: Tensor, top_p: float) -> Tensor:
    """long [..., 1]: how many of the descending logits `sorted_x` the nucleus keeps."""
    sorted_p = (sorted_x - lse).exp()
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # exactly 0 for the first token
    # Keep token j while the mass before it is still short of top_p: the smallest prefix
    # reaching top_p. At least the first: a top_p below float32's smallest value (5e-324,
    # found by fuzzing the endpoint) compares as 0 against the tensor and would keep none.
    return (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """[..., V] logits -> float32 probabilities [..., V] under `params`.

    Order: divide by temperature, keep the top_k largest (ties with the k-th kept), then
    keep the smallest set of most likely tokens whose mass reaches top_p (at least one
    token; tokens tied with the last kept one are kept too, so the result does not depend
    on how a sort orders ties), and renormalise. Greedy params give the one-hot of the
    argmax (first index on ties, like torch.argmax and the greedy verifier).
    """
    _check_vocab_dim("logits", logits)
    if params.greedy:
        idx = logits.argmax(dim=-1, keepdim=True)
        out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return out.scatter_(-1, idx, 1.0)

    # Division allocates a new tensor, so the masked_fill calls below never touch the
    # caller's logits even when they are already float32. The max is subtracted first: a
    # tiny temperature (1e-300 is valid) then sends the rest to -inf, not everything to
    # +inf (inf - inf is NaN), and the result is the greedy limit, the ties kept.
    x = logits.float()
    x = x - x.amax(dim=-1, keepdim=True)
    # below 1e-30 the temperature would underflow in float32 (x / 0): scale by float32's
    # largest instead, which already sends any real gap in the logits to -inf
    x = x / params.temperature if params.temperature >= 1e-30 else x * 3.0e38
    vocab = x.shape[-1]

    # Descending logits of the candidate set, needed only by top-p. With top-k they come
    # for free from topk (k values), so the full-vocabulary sort is avoided.
    sorted_x = None
    if 0 < params.top_k < vocab:
        sorted_x = x.topk(params.top_k, dim=-1).values
        x = x.masked_fill(x < sorted_x[..., -1:], float("-inf"))

    if params.top_p < 1.0:
        # The normaliser comes from all of x, so ties past the k-th value are counted.
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        n_keep = None
        if sorted_x is None and vocab > _NUCLEUS_PROBE:
            # A full sort of 152k logits costs ~10 ms on a CPU core, topk(1024) ~0.5 ms,
            # and the nucleus is usually far smaller: the k largest values are exactly the
            # first k of the full sort, so if the nucleus ends inside them we are done.
            sorted_x = x.topk(_NUCLEUS_PROBE, dim=-1).values
            n_keep = _nucleus_size(sorted_x, lse, params.top_p)
            if bool((n_keep >= _NUCLEUS_PROBE).any()):
                sorted_x, n_keep = None, None  # it may extend past the probe: sort it all
        if sorted_x is None:
            sorted_x = x.sort(dim=-1, descending=True).values
        if n_keep is None:
            n_keep = _nucleus_size(sorted_x, lse, params.top_p)
        # Threshold on the last kept value: ties with it stay in, whatever the sort order.
        threshold = sorted_x.gather(-1, n_keep - 1)
        x = x.masked_fill(x < threshold, float("-inf"))

    return torch.softmax(x, dim=-1)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row of `probs` [..., V]; returns long [...].

    Inverse-CDF sampling in float64 with exactly one uniform per row: the stream use is
    `torch.rand(probs.shape[:-1] + (1,), dtype=float64, generator=generator)` (row-major),
    which the acceptance code relies on when it documents its own draws. Rows are treated
    as non-negative weights (they need not sum exactly to 1); a token of weight 0 is never
    drawn. Rows with no positive (or non-finite) total raise ValueError.
    """
    _check_vocab_dim("probs", probs)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[..., -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("probs rows must have a finite positive total mass")
    # The uniforms are drawn where the generator lives, then moved, so a CPU generator
    # works with probs on an accelerator.
    device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[:-1] + (1,), dtype=torch.float64, generator=generator, device=device)
    u = u.to(probs.device)
    # First index whose cdf exceeds u * total: zero-weight tokens have cdf equal to their
    # predecessor's and so are never the first to exceed it.
    idx = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to total; then fall back to the last token with positive
    # weight (the first index where the cdf reaches its total), never past the end.
    last = torch.searchsorted(cdf, total.contiguous(), right=False)
    return torch.minimum(idx, last).squeeze(-1)
