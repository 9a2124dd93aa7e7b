"""How each sequence in a forward attends: which cache slots, under which mask, at which
RoPE positions, planned once per forward for each kind of layer (full, sliding, linear)
and for TidalDecode's sparse steps. The layers (`actors.layers`) only follow the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from actors import linear_attention as lin
from actors.tidal import MAX_SPARSE_TOKENS, SparseStep, TidalConfig
from decoding.kv_cache import KVCache


@dataclass
class AttnPlan:
    """How one kind of layer (full / sliding) attends in this forward; shared by its layers."""
    lo: int  # first cache slot attended (sliding layers skip slots out of every query's window)
    mask: Tensor | None  # bool [g*T, end - lo], already repeated for the folded GQA layout
    causal: bool  # plain prefill of an empty cache: let SDPA do the causal mask
    cos: Tensor  # [T, head_dim]
    sin: Tensor
    # Row-exact models only: per new token, the cache slots it sees, in order (a slice when
    # they are contiguous). Each row then attends alone, in exactly the call a one-token
    # decoding step makes, so its result cannot depend on what else is in the forward.
    rows: list[slice | Tensor] | None = None
    linear: lin.LinearStep | None = None  # linear layers: slots read and masks (actors.linear_attention)
    native_rows: tuple | None = None  # `rows` as the native attention reads them, built on first use (actors.fused)


class BatchItem(NamedTuple):
    """One sequence's part of a batched forward (``Transformer.forward_batch``)."""
    tokens: Tensor  # long [T]
    cache: KVCache  # its own cache; the T new entries go at its length
    positions: Tensor | None = None
    tree_mask: Tensor | None = None
    prefill: bool = False  # a prompt chunk (attended as one batch, as ``forward_hidden`` does)
    sparse: TidalConfig | None = None  # TidalDecode attention for this sequence's forward (``forward_hidden``)


@dataclass
class Segment:
    """One sequence's new tokens in a forward: rows `rows` of the batch, written to its own
    cache from slot `start`, attending as its own plans say."""
    rows: slice
    cache: KVCache
    start: int
    plans: dict[str, AttnPlan]
    step: SparseStep | None = None
    sums: list[Tensor | None] | None = None


def sparse_step(model: nn.Module, sparse: TidalConfig | None, T: int, start: int,
                tree_mask: Tensor | None) -> SparseStep | None:
    """Sparse attention applies to short forwards over a cache longer than the budget
    (with a budget >= the cache it would select everything: plain attention it is)."""
    if sparse is None or T > MAX_SPARSE_TOKENS or start <= sparse.budget:
        return None
    model.check_sparse(sparse)
    new_mask = None
    if T > 1:
        new = tree_mask if tree_mask is not None else torch.ones(T, T, dtype=torch.bool, device=model.device).tril()
        g = model.config.n_heads // model.config.n_kv_heads
        new_mask = new.repeat(g, 1)
    return SparseStep(sparse, start, new_mask)


def plan_attention(model: nn.Module, T: int, start: int, positions: Tensor | None, tree_mask: Tensor | None,
                   dtype: torch.dtype, prefill: bool = False) -> dict[str, AttnPlan]:
    """Masks and RoPE tables, built once per forward for each kind of layer of `model` (an
    `actors.model.Transformer`)."""
    cfg, dev, g = model.config, model.device, model.config.n_heads // model.config.n_kv_heads
    end = start + T
    pos = positions if positions is not None else torch.arange(start, end, device=dev)

    def rope(inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        freqs = pos[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def new_part() -> Tensor:  # which new tokens each new token sees
        if tree_mask is not None:
            return tree_mask
        return torch.ones(T, T, dtype=torch.bool, device=dev).tril()

    def fold(mask: Tensor) -> Tensor:  # rows for the folded GQA query layout
        return mask.repeat(g, 1) if g > 1 else mask

    plans: dict[str, AttnPlan] = {}
    kinds = set(cfg.layer_types)
    if "full_attention" in kinds:
        cos, sin = rope(model.inv_freq)
        if tree_mask is None and T == 1:
            plans["full_attention"] = AttnPlan(0, None, False, cos, sin)
        elif tree_mask is None and start == 0:
            plans["full_attention"] = AttnPlan(0, None, True, cos, sin)
        else:
            m = torch.ones(T, end, dtype=torch.bool, device=dev)
            m[:, start:] = new_part()
            plans["full_attention"] = AttnPlan(0, fold(m), False, cos, sin)
    if "sliding_attention" in kinds:
        w = cfg.sliding_window
        cos, sin = rope(model.inv_freq_local)
        if positions is None:
            pmin, pmax = start, end - 1
        else:
            pmin, pmax = (int(v) for v in torch.stack(positions.aminmax()).tolist())
        # committed slots below lo are out of every query's window (slot i holds position i)
        lo = min(max(0, pmin - w + 1), start)
        in_window = pmax - lo < w  # every attended key is within every query's window
        if in_window and tree_mask is None and T == 1:
            plan = AttnPlan(lo, None, False, cos, sin)
        elif in_window and tree_mask is None and start == 0:
            plan = AttnPlan(0, None, True, cos, sin)
        else:
            plan = None
        if plan is None:
            m = torch.ones(T, end - lo, dtype=torch.bool, device=dev)
            m[:, start - lo:] = new_part()
            if not in_window:
                kpos = torch.cat((torch.arange(lo, start, device=dev), pos))
                m &= (pos[:, None] - kpos[None, :]) < w
            plan = AttnPlan(lo, fold(m), False, cos, sin)
        plans["sliding_attention"] = plan
    if "linear_attention" in kinds:
        cos, sin = rope(model.inv_freq)
        plans["linear_attention"] = AttnPlan(0, None, False, cos, sin,
                                              linear=lin.plan_step(cfg.linear, start, pos, tree_mask))
    # a fresh prefill is the same call either way
    if model.row_exact and not prefill and not (tree_mask is None and start == 0 and T > 1):
        visible = new_part().tolist()
        for kind, plan in plans.items():
            window = cfg.sliding_window if kind == "sliding_attention" else None
            plan.rows = row_slots(start, pos.tolist(), visible, window)
    return plans

def row_slots(start: int, pos: list[int], visible: list[list[bool]], window: int | None) -> list[slice | Tensor]:
    """For each new token, the cache slots it attends to, in slot order: the committed
    slots [0, start) (those in its window), then the new tokens it may see. A decoding
    step sees the same keys in the same order, as one contiguous slice."""
    rows: list[slice | Tensor] = []
    for r, p in enumerate(pos):
        lo = 0 if window is None else max(0, p - window + 1)
        prefix = range(min(lo, start), start)
        new = [start + j for j, seen in enumerate(visible[r]) if seen and (window is None or p - pos[j] < window)]
        first = prefix.start if prefix else new[0]
        if new == list(range(start if prefix else first, new[-1] + 1)):  # no gap: one slice, as decoding has
            rows.append(slice(first, new[-1] + 1))
        else:
            rows.append(torch.tensor([*prefix, *new]))
    return rows
