"""TidalDecode: position-persistent sparse attention for long contexts (arXiv 2410.05076).

At long context a decoding step is dominated by reading every layer's whole KV cache,
yet most layers put nearly all their attention on a few positions, and consecutive
layers agree on which. So in one forward of a few new tokens:

- `full` layers (the first two) attend over the whole cache, as usual;
- a `select` layer also attends fully, and keeps the `budget` cached positions its
  queries weighted most (summed over the query heads of each KV head and over the new
  tokens): one set per KV head;
- every `sparse` layer after it attends only to those positions (plus the new tokens),
  until the next `select` layer refreshes the set.

The set is chosen afresh in every forward; it persists across layers, not steps.
Layers of a model with sliding-window attention are not covered (refused).

Sparse attention is an approximation of the model. Used by a drafter (a draft model, or
the target drafting for itself) the output stays the target's, since a full-attention
verify decides; used by the target itself it is labelled approximate everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BUDGET = 256
# Re-selection layers measured on the built-ins by model depth (qwen2.5-coder-1.5b has 28
# layers, -0.5b 24), with `benchmarks/tidal_layout.py` at 4k context, budget 256, on needle
# prompts that bench-long does not use (results: benchmarks/results/tidal/layout-*.json).
# Two measures: the attention mass the sparse layers keep, and needles retrieved with the
# target attending sparsely. The mass alone favours an early re-selection (layer 4 of 28:
# 0.80 kept) that loses needles (1 of 3); the 1.5B's layer 8 keeps 0.80 and found 3 of 3.
# The 0.5B finds few needles at budget 256 with any layout; layer 5 keeps the most mass.
# Other depths scale the paper's Llama-3-8B layout (re-select at 13 of 32 layers).
MEASURED_RESELECT: dict[int, int] = {28: 8, 24: 5}
# A forward of more new tokens than this (a prefill chunk) attends fully: sparse
# attention is for decoding steps, drafts and verifies.
MAX_SPARSE_TOKENS = 64


@dataclass(frozen=True)
class TidalConfig:
    budget: int = DEFAULT_BUDGET  # cached positions each KV head keeps in sparse layers
    full_layers: tuple[int, ...] = (0, 1)  # attend fully, select nothing
    select_layers: tuple[int, ...] = (2,)  # attend fully and (re)select the positions

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"tidal budget must be >= 1 cached position, got {self.budget}")
        if not self.select_layers:
            raise ValueError("tidal attention needs at least one selection layer")
        if sorted(set(self.select_layers)) != list(self.select_layers) or min(self.select_layers) < 0:
            raise ValueError(f"tidal select_layers must be increasing layer indices, got {self.select_layers}")
        if set(self.full_layers) & set(self.select_layers):
            raise ValueError("a layer cannot be both a full and a selection layer")
        if any(i > self.select_layers[0] for i in self.full_layers):
            raise ValueError("tidal full layers come before the first selection layer")

    @classmethod
    def for_model(cls, n_layers: int, budget: int = DEFAULT_BUDGET) -> "TidalConfig":
        """Layers 0-1 full, select at 2, re-select where measured for this depth, else the
        paper's layout scaled: Llama-3-8B (32 layers) re-selects at 13 (about 40% deep)."""
        if n_layers < 4:
            return cls(budget, (), (0,))
        reselect = MEASURED_RESELECT.get(n_layers, max(3, round(n_layers * 13 / 32)))
        return cls(budget, (0, 1), (2, reselect) if reselect < n_layers else (2,))

    @classmethod
    def parse(cls, spec: str, n_layers: int) -> "TidalConfig":
        """`tidal`, `tidal:BUDGET` or `tidal:BUDGET:S1,S2,...` (selection layers; the layers
        before S1 attend fully), laid out for a model of `n_layers` layers."""
        check_spec(spec)
        _, _, rest = spec.partition(":")
        budget, _, layers = rest.partition(":")
        budget = int(budget) if budget else DEFAULT_BUDGET
        if layers:
            selects = tuple(int(x) for x in layers.split(","))
            cfg = cls(budget, tuple(range(selects[0])), selects)
        else:
            cfg = cls.for_model(n_layers, budget)
        if cfg.select_layers[-1] >= n_layers:
            raise ValueError(f"tidal selection layer {cfg.select_layers[-1]} is past this model's {n_layers} layers")
        return cfg

    def role(self, layer: int) -> str:
        if layer in self.select_layers:
            return "select"
        if layer in self.full_layers or layer < self.select_layers[0]:
            return "full"
        return "sparse"

    def describe(self) -> str:
        return f"tidal:{self.budget} (full {list(self.full_layers)}, select {list(self.select_layers)})"


def check_spec(spec: str | None) -> None:
    """Refuse a malformed `--attention` / `--draft-attention` value before anything loads."""
    if spec is None:
        return
    name, colon, rest = spec.partition(":")
    if name != "tidal":
        raise ValueError(f"attention must be 'tidal', 'tidal:BUDGET' or 'tidal:BUDGET:S1,S2', got {spec!r}")
    budget, colon2, layers = rest.partition(":")
    if colon and not (budget.isdigit() and int(budget) >= 1):
        raise ValueError(f"tidal budget must be a positive integer (cached positions), got {budget!r}")
    if colon2:
        parts = layers.split(",")
        if not all(x.isdigit() for x in parts) or [int(x) for x in parts] != sorted(set(int(x) for x in parts)):
            raise ValueError(f"tidal selection layers must be increasing layer indices like 2,11; got {layers!r}")


@dataclass
class SparseStep:
    """One forward's sparse-attention state, passed down the layers."""
    cfg: TidalConfig
    start: int  # committed cache slots; the selection picks among [0, start)
    new_mask: Tensor | None  # bool [g*T, T] folded: which new tokens each query row sees (None: T == 1)
    selected: Tensor | None = None  # long [n_kv, budget], sorted cache slots


def attend_select(q: Tensor, kc: Tensor, vc: Tensor, end: int, step: SparseStep, scale: float) -> Tensor:
    """Full attention of folded queries q [n_kv, g*T, D] over slots [0, end), written out so
    the weights are at hand; keeps the `budget` committed slots each KV head weighted most."""
    scores = torch.matmul(q, kc[:, :end].transpose(1, 2)).float() * scale  # [n_kv, g*T, end]
    if step.new_mask is not None:
        scores[:, :, step.start:].masked_fill_(~step.new_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.to(vc.dtype), vc[:, :end])
    k = min(step.cfg.budget, step.start)
    mass = weights[:, :, : step.start].sum(dim=1)  # [n_kv, start]: over query heads and new tokens
    step.selected = mass.topk(k, dim=-1).indices.sort(dim=-1).values
    return out


def attend_sparse(q: Tensor, kc: Tensor, vc: Tensor, end: int, step: SparseStep, scale: float) -> Tensor:
    """Attention of folded queries q [n_kv, g*T, D] over the selected committed slots and the
    new tokens only."""
    idx = step.selected[..., None].expand(-1, -1, kc.shape[-1])
    keys = torch.cat((torch.gather(kc, 1, idx), kc[:, step.start:end]), dim=1)
    vals = torch.cat((torch.gather(vc, 1, idx), vc[:, step.start:end]), dim=1)
    mask = None
    if step.new_mask is not None:
        seen = torch.ones(step.new_mask.shape[0], idx.shape[1], dtype=torch.bool, device=q.device)
        mask = torch.cat((seen, step.new_mask), dim=1)
    return F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=mask, scale=scale)[0]
