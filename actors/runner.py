"""One model and the KV cache of one sequence. Role-agnostic: it drafts or it verifies.

The cache mirrors `tokens` (committed, or speculative on the drafting side) in slots
[0, len(tokens)); a verify forward appends a token tree behind them, and `commit_path`
keeps only the accepted branch. `sync` makes the cache agree with a context by cropping
to the longest common prefix, which is how a drafter rolls back after a rejection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from actors import hardware, kernels, quantized
from actors.model import Transformer
from actors.tidal import MAX_SPARSE_TOKENS, TidalConfig
from decoding.draft_length import DraftLengthPolicy
from decoding.sampling import SamplingParams, logits_to_probs, sample
from decoding.tree import TokenTree


@dataclass
class Proposal:
    tree: TokenTree  # root = newest committed token, then the drafts
    draft_probs: torch.Tensor | None  # [N, V]: row i is q for node i's children (sampling only)
    predicted: float  # expected number of accepted drafts, from the draft's confidence
    depth: int  # drafted chain length
    seconds: float
    # `keep_rows`: row i is the draft's distribution the chain's token at depth i + 1 came
    # from (its confidence and its runners-up: where SSD guesses the verdict's outcomes)
    rows: torch.Tensor | None = None


@dataclass
class Snapshot:
    """A runner's cache and tokens after a prefill, to decode from again (bench-long)."""
    tokens: list[int]
    k: torch.Tensor
    v: torch.Tensor
    last: tuple[torch.Tensor, torch.Tensor]  # (hidden, logits) after the last token
    linear: object = None  # a linearized model's state checkpoints (actors.linear_attention.LinearState)


# Prompts are prefilled in chunks of this many tokens: attention scores and MLP
# activations stay bounded however long the prompt (no T x T matrix for a 16k prompt).
PREFILL_CHUNK = 512


class ModelRunner:
    def __init__(self, model: Transformer, max_len: int = 2048, attention: TidalConfig | None = None):
        """`attention`: sparse (TidalDecode) attention for every short forward of this runner:
        a draft's steps (exact output, since the target verifies), or the target's own
        (approximate). `max_len`: the cache's first size; it grows per request."""
        self.model = model
        self.cache = model.new_cache(max_len)
        self.tokens: list[int] = []
        self.kernels: dict[str, list[str]] = {}  # shape class -> kernel per row count, once tuned
        self.attention = attention
        self.prefill_chunk = PREFILL_CHUNK
        self._last: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (length, hidden, logits) after a prefill
        if attention is not None:
            model.check_sparse(attention)

    @classmethod
    def for_serving(cls, model: Transformer, max_len: int, progress: bool = False,
                    attention: TidalConfig | None = None) -> "ModelRunner":
        """Take a built model (`LoadedModel.build()`), choose its dense kernels by measurement
        (cached per CPU), and touch the weights once, so the first request measures
        decoding, not page faults. The cache starts small; requests size it."""
        runner = cls(model, min(max_len, 512), attention)
        runner.kernels = runner.model.tune_kernels(progress=progress)
        runner.feed([0, 0])
        runner.reset()
        return runner

    def measure_verify_costs(self, sizes: tuple[int, ...] = (1, 2, 4, 8, 16), context: int = 128) -> dict[int, float]:
        """Seconds for one forward of k tokens after `context` cached ones, for each k: how
        the cost of verifying grows with the tokens verified on this device and precision
        (flat while memory-bound; steep once compute-bound, as a 4-bit target is). Seeds
        the draft-length policy, so it need not learn the curve from the first requests."""
        vocab = self.vocab_size
        self.reset(context + max(sizes) + 1)
        self.feed([(7 * i + 3) % vocab for i in range(context)])
        base, costs = self.cache.length, {}
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda: None)
        for k in sizes:
            for _ in range(2):  # the faster of two: one stray stall should not shape every tree
                self.cache.crop(base)
                sync()
                start = time.perf_counter()
                self.model(torch.arange(k) % vocab, self.cache)
                sync()
                costs[k] = min(costs.get(k, float("inf")), time.perf_counter() - start)
        self.reset()
        return costs

    def runtime_info(self) -> dict:
        """What this model runs with here: dtype, device, kernel per shape class."""
        info = {"dtype": self.precision, "device": str(self.model.device),
                "kernels": {**kernels.summarize(self.kernels), **quantized.summary(self.model)}}
        if self.attention is not None:
            info["attention"] = self.attention.describe()
        info["layers"] = "fused native calls (actors/fused.py)" if self.model.fused_layers() else "torch modules"
        lin = self.model.config.linear
        if lin is not None:
            n = sum(t == "linear_attention" for t in self.model.config.layer_types)
            info["linear"] = (f"linear attention in {n} of {self.model.config.n_layers} layers "
                              f"(groups of {lin.group}, {2 * lin.features} features, {lin.conv}-tap V convolution)")
        return info

    @property
    def precision(self) -> str:
        """How the weights are held: a dense dtype, or the GGUF block types of a quantized model."""
        blocks = sorted({m.qweight.type_name for m in self.model.modules() if hasattr(m, "qweight")})
        return "+".join(blocks) if blocks else hardware.dtype_name(self.model.dtype)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def approximate(self) -> bool:
        """True when this runner's own outputs come from sparse attention."""
        return self.attention is not None

    def reset(self, max_len: int | None = None) -> None:
        if max_len is not None and max_len > self.cache.max_len:
            self.cache = None  # free the old cache before allocating the new one
            self.cache = self.model.new_cache(max_len)
        self.cache.crop(0)
        self.tokens = []
        self._last = None

    def start(self, prompt: Sequence[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill `prompt` into a cache of at least `max_len` slots; return the last token's
        (hidden, logits). A runner restored from a snapshot of this very prompt skips the
        prefill (bench-long decodes every method from one prefill)."""
        if self._last is not None and self._last[0] == len(self.tokens) and self.tokens == list(prompt):
            self.reserve(max_len)
            return self._last[1], self._last[2]
        self.reset(max_len)
        return self.prefill(prompt)

    def reserve(self, max_len: int) -> None:
        """Grow the cache to `max_len` slots, keeping its entries."""
        if max_len <= self.cache.max_len:
            return
        old, n = self.cache, self.cache.length
        self.cache = self.model.new_cache(max_len)
        self.cache.k[..., :n, :] = old.k[..., :n, :]
        self.cache.v[..., :n, :] = old.v[..., :n, :]
        self.cache.length = n
        self.cache.linear = old.linear  # same slots: a linearized model's checkpoints still hold

    def prefill(self, tokens: Sequence[int], progress: Callable[[int, int], None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `tokens` in chunks of `prefill_chunk` with full attention; return the last
        token's (hidden [d], logits [V]). `progress(done, total)` after each chunk."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("nothing to prefill")
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i:i + self.prefill_chunk]
            h = self.model.forward_hidden(torch.tensor(chunk, dtype=torch.long), self.cache, prefill=True)[-1:]
            self.tokens.extend(chunk)
            if progress is not None:
                progress(i + len(chunk), len(tokens))
        logits = self.model.logits(h)[0]
        self._last = (len(self.tokens), h[0], logits)
        return h[0], logits

    def snapshot(self) -> Snapshot:
        """A copy of the cache's valid slots, the tokens and the last prefill's outputs."""
        if self._last is None or self._last[0] != len(self.tokens):
            raise ValueError("snapshot needs a runner just prefilled (start/prefill)")
        n = self.cache.length
        return Snapshot(list(self.tokens), self.cache.k[..., :n, :].clone(), self.cache.v[..., :n, :].clone(),
                        (self._last[1], self._last[2]), self.cache.linear and self.cache.linear.copy())

    def restore(self, snap: Snapshot, max_len: int | None = None) -> None:
        n = len(snap.tokens)
        self.reset(max(max_len or 0, n + 1))
        self.cache.k[..., :n, :] = snap.k
        self.cache.v[..., :n, :] = snap.v
        self.cache.length = n
        if snap.linear is not None:  # else a linearized model refolds its state on the next forward
            self.cache.linear = snap.linear.copy()
        self.tokens = list(snap.tokens)
        self._last = (n, *snap.last)

    def sync(self, context: Sequence[int]) -> list[int]:
        """Drop cached entries that disagree with `context`; return the tokens still to feed."""
        n = 0
        limit = min(len(self.tokens), len(context))
        while n < limit and self.tokens[n] == context[n]:
            n += 1
        self.cache.crop(n)
        del self.tokens[n:]
        return list(context[n:])

    def feed(self, tokens: Sequence[int], sparse: TidalConfig | None = None) -> torch.Tensor:
        """Append tokens to the cache; return the logits [V] after the last one. Long inputs
        are prefilled in chunks; short ones attend sparsely with `sparse` (default: this
        runner's `attention`)."""
        if len(tokens) > MAX_SPARSE_TOKENS:
            return self.prefill(tokens)[1]
        sparse = sparse if sparse is not None else self.attention
        logits = self.model(torch.tensor(tokens, dtype=torch.long), self.cache, last_only=True, sparse=sparse)
        self.tokens.extend(tokens)
        return logits[-1]

    def feed_hidden(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`feed`, also returning the last token's final hidden state [d] (what heads draft from)."""
        if len(tokens) > MAX_SPARSE_TOKENS:
            return self.prefill(tokens)
        h = self.model.forward_hidden(torch.tensor(tokens, dtype=torch.long), self.cache, sparse=self.attention)[-1:]
        self.tokens.extend(tokens)
        return h[0], self.model.logits(h)[0]

    # ---- verifying side -------------------------------------------------------------
    def score_tree(self, context: Sequence[int], tree: TokenTree) -> torch.Tensor:
        """Target logits [N, V] for every tree node; `context[-1]` is the tree's root."""
        return self.model.logits(self.score_tree_hidden(context, tree))

    def score_tree_hidden(self, context: Sequence[int], tree: TokenTree) -> torch.Tensor:
        """Final hidden states [N, d] for every tree node (`score_tree` before the lm_head)."""
        pending = self.sync(context[:-1])
        if pending:
            self.feed(pending)
        if tree.is_chain():
            return self.model.forward_hidden(tree.tokens, self.cache, sparse=self.attention)
        return self.model.forward_hidden(tree.tokens, self.cache, positions=tree.positions(self.cache.length),
                                         tree_mask=tree.attention_mask(), sparse=self.attention)

    def commit_path(self, tree: TokenTree, accepted: list[int]) -> None:
        """Keep the root's and the accepted nodes' K/V, in place; forget the other branches."""
        keep = [0] + accepted
        self.cache.compact(len(self.tokens), keep)
        self.tokens.extend(tree.tokens[keep].tolist())

    # ---- drafting side --------------------------------------------------------------
    def propose(
        self,
        context: Sequence[int],
        params: SamplingParams,
        policy: DraftLengthPolicy,
        max_depth: int,
        width: int = 1,
        generator: torch.Generator | None = None,
        self_draft: TidalConfig | None = None,
        stop: Callable[[], bool] | None = None,
        keep_rows: bool = False,
    ) -> Proposal:
        """Draft a chain from `context`, with `width - 1` extra sibling leaves per depth.

        The siblings cost no extra draft forward: they come from the same distribution
        as the chain token at their depth (the next top-k under greedy; further i.i.d.
        samples under sampling, which recursive rejection needs to stay lossless).

        `self_draft`: this runner is the target drafting for itself with sparse attention
        over its own cache (no second cache): committed tokens are fed with full attention,
        the drafts sparsely, and the drafts' entries are dropped afterwards, so the verify
        recomputes them exactly.

        `stop`: asked after each depth; True ends the chain there (SSD: the verdict it was
        pre-drafting for has arrived). A chain cut short is still a valid draft.
        """
        start = time.perf_counter()
        pending = self.sync(context[:-1])
        if self_draft is not None and pending:
            self.feed(pending)
            pending = []
        committed = len(self.tokens)
        # Always re-feed the newest token: its logits are where drafting starts.
        logits = self.feed(pending + [context[-1]], sparse=self_draft)
        tokens, parents, q_rows = [context[-1]], [-1], {}
        chain_node, accept_probs, rows = 0, [], []
        while True:
            if params.greedy:
                top = torch.topk(logits, width)
                picks = top.indices.tolist()
                probs = torch.softmax(logits.float(), -1)
                confidence = probs[picks[0]].item()
                if keep_rows:
                    rows.append(probs)
            else:
                q = logits_to_probs(logits, params)
                if keep_rows:
                    rows.append(q)
                # `sample` draws on the generator's device: a CPU generator with CUDA logits works
                picks = sample(q.expand(width, -1), generator).tolist()
                q_rows[chain_node] = q
                confidence = q.max().item()
            accept_probs.append(confidence * (accept_probs[-1] if accept_probs else 1.0))
            first_child = len(tokens)
            tokens += picks
            parents += [chain_node] * width
            chain_node = first_child
            depth = len(accept_probs)
            if depth >= max_depth or not policy.keep_drafting(depth, accept_probs) or (stop is not None and stop()):
                break
            logits = self.feed([picks[0]], sparse=self_draft)
        if self_draft is not None:
            self.cache.crop(committed)
            del self.tokens[committed:]
        tree = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
        draft_probs = None
        if not params.greedy:
            draft_probs = torch.zeros(len(tokens), logits.shape[-1])
            for node, q in q_rows.items():
                draft_probs[node] = q
        return Proposal(tree, draft_probs, sum(accept_probs), depth, time.perf_counter() - start,
                        torch.stack(rows) if keep_rows else None)
