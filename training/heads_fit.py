"""Stages 5 and 6 of `specray train-heads`: AdamW over all heads against the target's soft
labels, and their held-out accuracy against its argmax.

Head k at position t learns the target's distribution at t+k+1 from h_t (and, for
Amphista, the embedding of token t+1). The schedule is recomputed from the step and the
batch order from the seed and epoch, so a run resumed from a checkpoint ends with the
very same heads as one never stopped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from actors.heads import DraftHeads
from actors.paths import safetensors_whole
from training.checkpoint import load_state, save_state
from training.config import TrainConfig

CHECKPOINT_EVERY = 50  # steps between saved training states


# ---- 5. training ----------------------------------------------------------------------------


def _positions(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position t with at least head 0's label (t + 1 < chunk end), and its chunk end."""
    starts = torch.cumsum(lengths, 0) - lengths
    pos, ends = [], []
    for s, n in zip(starts.tolist(), lengths.tolist()):
        pos.append(torch.arange(s, s + n - 1))
        ends.append(torch.full((n - 1,), s + n))
    return torch.cat(pos), torch.cat(ends)


def _labels(data: dict, hot_index: torch.Tensor, at: torch.Tensor, valid: torch.Tensor):
    """Soft labels at rows `at` in hot-vocab coordinates: (index [..., 8], weight [..., 8])."""
    at = at.clamp(max=data["top_ids"].shape[0] - 1)
    idx = hot_index[data["top_ids"][at].long()]
    w = data["top_p"][at].float() * (idx >= 0) * valid.unsqueeze(-1)
    return idx.clamp(min=0), w


def _embedded(heads: DraftHeads, data: dict, batch: torch.Tensor) -> torch.Tensor | None:
    """The target's embedding of token t+1 for positions `batch`, for kinds that read it."""
    if not heads.uses_token:
        return None
    return data["embed_rows"][data["embed_index"][data["ids"][batch + 1]]]


def _loss(heads: DraftHeads, data: dict, hot_index: torch.Tensor, batch: torch.Tensor, ends: torch.Tensor,
          bf16: bool):
    h = data["hidden"][batch].float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the [K*B, d] x [d, H] product
        logits = heads(h, _embedded(heads, data, batch)).float()  # [K, B, H]
    logp = F.log_softmax(logits, -1)
    total = 0.0
    for k in range(heads.n_heads):
        at = batch + k + 1
        idx, w = _labels(data, hot_index, at, at < ends)
        total = total - (logp[k].gather(-1, idx) * w).sum() / w.sum().clamp(min=1.0)
    return total / heads.n_heads


def train(cfg: TrainConfig, heads: DraftHeads, data: dict) -> None:
    from actors import hardware

    bf16 = hardware.probe("cpu").native_bf16  # the big product in bf16 only where the CPU multiplies it natively
    vocab = heads.cfg.vocab_size
    hot_index = torch.full((vocab,), -1, dtype=torch.long)
    hot_index[heads.hot_ids] = torch.arange(heads.hot_ids.numel())
    pos, ends = _positions(data["lengths"])
    steps_per_epoch = math.ceil(pos.numel() / cfg.batch)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(list(heads.trained().values()), lr=cfg.lr, weight_decay=0.0)
    state = cfg.work / f"train-state-{heads.cfg.kind}.safetensors"
    step = load_state(state, heads.trained(), opt)[0] if safetensors_whole(state) else 0
    bar = tqdm(total=total, initial=step, desc=f"train {heads.cfg.kind} heads", unit="step")
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        sel = order[i * cfg.batch:(i + 1) * cfg.batch]
        for g in opt.param_groups:  # cosine decay, recomputed from the step so resuming is exact
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = _loss(heads, data, hot_index, pos[sel], ends[sel], bf16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        if step % CHECKPOINT_EVERY == 0 or step == total:
            save_state(state, heads.trained(), opt, step)
    bar.close()


# ---- 6. evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(heads: DraftHeads, data: dict, ranks: int = 10) -> dict:
    """Per head: how often the target's argmax at its offset is the head's top-1, is in
    its top-5, and sits at each of its first `ranks` ranks (what static trees are built from)."""
    pos, ends = _positions(data["lengths"])
    at_rank = torch.zeros(heads.n_heads, ranks)
    seen = torch.zeros(heads.n_heads)
    for i in range(0, pos.numel(), 1024):
        batch, end = pos[i:i + 1024], ends[i:i + 1024]
        logits = heads(data["hidden"][batch].float(), _embedded(heads, data, batch))
        top = heads.hot_ids[logits.topk(ranks, dim=-1).indices]  # [K, B, ranks]
        for k in range(heads.n_heads):
            at = batch + k + 1
            ok = at < end
            want = data["top_ids"][at.clamp(max=data["top_ids"].shape[0] - 1), 0].long()
            at_rank[k] += ((top[k] == want[:, None]) & ok[:, None]).sum(0).float()
            seen[k] += ok.sum()
    rank_acc = at_rank / seen.clamp(min=1)[:, None]
    return {"top1": [round(float(r[0]), 4) for r in rank_acc],
            "top5": [round(float(r[:5].sum()), 4) for r in rank_acc],
            "rank_accuracy": [[round(float(v), 5) for v in r] for r in rank_acc],
            "positions": [int(s) for s in seen]}
