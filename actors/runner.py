"""One model and the KV cache of one sequence. Role-agnostic: it drafts or it verifies.

The cache mirrors `tokens` (committed, or speculative on the drafting side) in slots
[0, len(tokens)); a verify forward appends a token tree behind them, and `commit_path`
keeps only the accepted branch. `sync` makes the cache agree with a context by cropping
to the longest common prefix, which is how a drafter rolls back after a rejection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from actors import hardware, kernels, quantized
from actors.model import Transformer
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


class ModelRunner:
    def __init__(self, model: Transformer, max_len: int = 2048):
        self.model = model
        self.cache = model.new_cache(max_len)
        self.tokens: list[int] = []
        self.kernels: dict[str, list[str]] = {}  # shape class -> kernel per row count, once tuned

    @classmethod
    def for_serving(cls, model: Transformer, max_len: int, progress: bool = False) -> "ModelRunner":
        """Take a built model (`LoadedModel.build()`), choose its dense kernels by measurement
        (cached per CPU), and touch the weights once, so the first request measures
        decoding, not page faults."""
        runner = cls(model, max_len)
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
        return {"dtype": self.precision, "device": str(self.model.device),
                "kernels": {**kernels.summarize(self.kernels), **quantized.summary(self.model)}}

    @property
    def precision(self) -> str:
        """How the weights are held: a dense dtype, or the GGUF block types of a quantized model."""
        blocks = sorted({m.qweight.type_name for m in self.model.modules() if hasattr(m, "qweight")})
        return "+".join(blocks) if blocks else hardware.dtype_name(self.model.dtype)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def reset(self, max_len: int | None = None) -> None:
        if max_len is not None and max_len > self.cache.max_len:
            self.cache = self.model.new_cache(max_len)
        self.cache.crop(0)
        self.tokens = []

    def sync(self, context: Sequence[int]) -> list[int]:
        """Drop cached entries that disagree with `context`; return the tokens still to feed."""
        n = 0
        limit = min(len(self.tokens), len(context))
        while n < limit and self.tokens[n] == context[n]:
            n += 1
        self.cache.crop(n)
        del self.tokens[n:]
        return list(context[n:])

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append tokens to the cache; return the logits [V] after the last one."""
        logits = self.model(torch.tensor(tokens, dtype=torch.long), self.cache, last_only=True)
        self.tokens.extend(tokens)
        return logits[-1]

    def feed_hidden(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`feed`, also returning the last token's final hidden state [d] (what heads draft from)."""
        h = self.model.forward_hidden(torch.tensor(tokens, dtype=torch.long), self.cache)[-1:]
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
            return self.model.forward_hidden(tree.tokens, self.cache)
        return self.model.forward_hidden(
            tree.tokens, self.cache, positions=tree.positions(self.cache.length), tree_mask=tree.attention_mask()
        )

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
    ) -> Proposal:
        """Draft a chain from `context`, with `width - 1` extra sibling leaves per depth.

        The siblings cost no extra draft forward: they come from the same distribution
        as the chain token at their depth (the next top-k under greedy; further i.i.d.
        samples under sampling, which recursive rejection needs to stay lossless).
        """
        start = time.perf_counter()
        # Always re-feed the newest token: its logits are where drafting starts.
        logits = self.feed(self.sync(context[:-1]) + [context[-1]])
        tokens, parents, q_rows = [context[-1]], [-1], {}
        chain_node, accept_probs = 0, []
        while True:
            if params.greedy:
                top = torch.topk(logits, width)
                picks = top.indices.tolist()
                confidence = torch.softmax(logits.float(), -1)[picks[0]].item()
            else:
                q = logits_to_probs(logits, params)
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
            if depth >= max_depth or not policy.keep_drafting(depth, accept_probs):
                break
            logits = self.feed([picks[0]])
        tree = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
        draft_probs = None
        if not params.greedy:
            draft_probs = torch.zeros(len(tokens), logits.shape[-1])
            for node, q in q_rows.items():
                draft_probs[node] = q
        return Proposal(tree, draft_probs, sum(accept_probs), depth, time.perf_counter() - start)
