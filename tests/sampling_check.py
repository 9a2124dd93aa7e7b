"""Exact sequence distributions of a tiny target, and a chi-squared test against them.

Used by every pipeline's sampling test: vocab 4, 4 new tokens, so all 256 continuations
can be enumerated and their exact probabilities computed from the target itself.

The models are as small as the property allows: one layer (a forward costs ~30% less than
with two, and the suite draws hundreds of thousands of sequences), peaky distributions, and
a heavily perturbed draft. Sparse attention needs two layers (one selects, one reads).
"""

from __future__ import annotations

import itertools

import torch
from scipy.stats import chisquare

from actors import loading
from actors.runner import ModelRunner
from decoding.ensemble import combine_logits
from decoding.sampling import SamplingParams, logits_to_probs

VOCAB, NEW, SAMPLES = 4, 4, 10_000
MODEL = {"vocab_size": VOCAB, "initializer_range": 0.3, "num_hidden_layers": 1}  # tiny_dir(family, **MODEL)
PROMPT = [2, 3]
LONG_PROMPT = [2, 3, 1, 0, 3, 3, 2, 1, 0, 2, 1, 3, 2]  # 13 tokens: past small budgets and several groups


def runners(tiny_dir, target_dtype: str = "float32", draft_dtype: str = "float32", layers: int = 1):
    def runner(dtype: str, **kw):
        path = tiny_dir("qwen2", **(MODEL | {"num_hidden_layers": layers}), **kw)
        return ModelRunner(loading.load(path, dtype, progress=False).build(), 64)

    # A heavily perturbed copy: agrees sometimes (multi-token accepts happen) and
    # disagrees often (rejections and residual sampling happen).
    return runner(target_dtype), runner(draft_dtype, noise=0.3)


def exact_sequence_probs(target: ModelRunner, params: SamplingParams,
                         prompt: list[int] = PROMPT, new: int = NEW) -> dict[tuple[int, ...], float]:
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=new):
        target.reset()
        logits = target.model(torch.tensor(prompt + list(seq[:-1])), target.cache)
        p = logits_to_probs(logits[len(prompt) - 1:], params)
        probs[seq] = float(torch.prod(p[torch.arange(new), torch.tensor(seq)]))
    return probs


def exact_combined_probs(runners, rule, params) -> dict[tuple[int, ...], float]:
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        rows = []
        for r in runners:
            r.reset()
            rows.append(r.model(torch.tensor(PROMPT + list(seq[:-1])), r.cache)[len(PROMPT) - 1:])
        p = logits_to_probs(combine_logits(rows, rule), params)
        probs[seq] = float(torch.prod(p[torch.arange(NEW), torch.tensor(seq)]))
    assert abs(sum(probs.values()) - 1) < 1e-4
    return probs


def seeds(n: int, start: int = 0, seed: int = 99) -> list[int]:
    """Sample seeds start..start+n of one fixed stream (so drawing in chunks draws the same)."""
    return torch.randint(0, 2**62, (start + n,), generator=torch.Generator().manual_seed(seed)).tolist()[start:]


def sample_sequences(target, draft, params, width: int = 1, n: int = SAMPLES, prompt: list[int] = PROMPT,
                     self_draft=None, start: int = 0) -> list[tuple[int, ...]]:
    """n whole sequences from the local decode loop with a fixed draft length, one seed each."""
    from cluster.local import DecodeConfig, speculative_generate
    from decoding.draft_length import DraftLengthPolicy

    policy = DraftLengthPolicy(fixed=NEW - 1, tokens_per_node=width)
    cfg = DecodeConfig(max_new_tokens=NEW, sampling=params, seed=1234, tree_width=width, draft_length=NEW - 1)
    out = []
    for s in seeds(n, start):
        cfg.seed = s
        out.append(tuple(speculative_generate(target, draft, prompt, cfg, policy, self_draft=self_draft).token_ids))
    return out


def chi2_pvalue(samples: list[tuple[int, ...]], probs: dict[tuple[int, ...], float]) -> float:
    counts = {s: 0 for s in probs}
    for s in samples:
        counts[s] += 1
    # Pool the rare sequences into one cell so every expected count is >= 5.
    n = len(samples)
    obs, exp, rare_o, rare_e = [], [], 0, 0.0
    for s, p in probs.items():
        if p * n >= 5:
            obs.append(counts[s])
            exp.append(p * n)
        else:
            rare_o, rare_e = rare_o + counts[s], rare_e + p * n
    if rare_e > 0:
        obs.append(rare_o)
        exp.append(rare_e)
    elif rare_o:
        return 0.0  # a sequence the target can never produce was produced
    total = sum(exp)
    return chisquare(obs, [e * n / total for e in exp]).pvalue




def caught_pvalue(draw, probs: dict[tuple[int, ...], float], n: int = SAMPLES, chunk: int = 2_000) -> float:
    """A power check's p-value: draw(start, count) sequences a chunk at a time, stopping at the
    first look that rejects (p < 1e-6). A broken rule shows within a few thousand samples
    (the linearized tree mutant: p ~ 1e-11 at 2,000), so only a rule the test cannot tell
    apart pays for all n. Five looks raise the false-alarm rate from 1e-6 to at most 5e-6."""
    samples: list[tuple[int, ...]] = []
    while True:
        samples += draw(len(samples), min(chunk, n - len(samples)))
        p = chi2_pvalue(samples, probs)
        if p < 1e-6 or len(samples) >= n:
            return p
