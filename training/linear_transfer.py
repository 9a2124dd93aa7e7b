"""Stages 2 and 3 of `specray linearize`: attention transfer. The frozen base's post-RoPE
q, k, v are captured once per chunk; then each layer's linearized attention is fitted
to reproduce that layer's softmax attention from them.

The layers learn independently from their true inputs (teacher forcing), so a captured
shard is all a step needs: training never runs the base model, one layer's backward at
a time bounds the memory, and the schedule is recomputed from the step so a resumed run
ends where an unbroken one would.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from actors import linear_attention as lin
from actors.paths import durable_replace, safetensors_whole
from training.checkpoint import load_state, save_state
from training.config import LinearizeConfig

CHECKPOINT_S = 60.0  # seconds between saved training states


# ---- 2. capture -----------------------------------------------------------------------------


def capture(model, chunks: dict, work: Path) -> dict[str, list[Path]]:
    """One forward per chunk; every layer's post-RoPE q [H, N, D] and k, v [Hkv, N, D], bf16,
    one safetensors file per chunk."""
    from safetensors.torch import save_file

    from actors.layers import rotate_half

    plan = [(split, j) for split in ("train", "heldout") for j in range(len(chunks[split]))]
    out: dict[str, list[Path]] = {"train": [], "heldout": []}
    todo = [(s, j) for s, j in plan if not safetensors_whole(work / f"cap-{s}-{j:04d}.safetensors")]
    for s, j in plan:
        out[s].append(work / f"cap-{s}-{j:04d}.safetensors")
    if not todo:
        return out
    cfg = model.config
    H, D = cfg.n_heads, cfg.head_dim
    qs: dict[int, torch.Tensor] = {}

    def hook(i):
        def grab(module, args, output):
            qs[i] = output.detach().clone()
        return grab

    handles = [blk.attn.wq.register_forward_hook(hook(i)) for i, blk in enumerate(model.layers)]
    bar = tqdm(total=sum(len(chunks[s][j]) for s, j in plan), desc="capture (q, k, v per layer)", unit="tok",
               unit_scale=True, initial=sum(len(chunks[s][j]) for s, j in plan if (s, j) not in todo))
    try:
        for s, j in todo:
            ids = torch.tensor(chunks[s][j])
            N = len(ids)
            cache = model.new_cache(N)
            qs.clear()
            with torch.inference_mode():
                model.forward_hidden(ids, cache, prefill=True)
                freqs = torch.arange(N, device=model.device).float()[:, None] * model.inv_freq[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                cos, sin = emb.cos().to(model.dtype), emb.sin().to(model.dtype)
                tensors = {}
                for i, blk in enumerate(model.layers):
                    q = qs[i].view(N, H, D).transpose(0, 1)
                    if blk.attn.q_norm is not None:
                        q = blk.attn.q_norm(q)
                    q = q * cos + rotate_half(q) * sin  # exactly as Attention.forward
                    tensors[f"q.{i}"] = q.to(torch.bfloat16).contiguous()
                    tensors[f"k.{i}"] = cache.k[i, 0, :, :N].to(torch.bfloat16).contiguous()
                    tensors[f"v.{i}"] = cache.v[i, 0, :, :N].to(torch.bfloat16).contiguous()
            path = work / f"cap-{s}-{j:04d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            durable_replace(tmp, path)
            bar.update(N)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return out


# ---- 3. train -------------------------------------------------------------------------------


def new_params(lcfg: lin.LinearConfig, n_layers: int, n_heads: int, n_kv: int, head_dim: int) -> list[lin.LinearParams]:
    return [lin.LinearParams(lcfg, n_heads, n_kv, head_dim) for _ in range(n_layers)]


def named(params: list[lin.LinearParams]) -> dict[str, torch.Tensor]:
    """The names `Transformer.linear_params()` uses: layers.I.NAME."""
    return {f"layers.{i}.{n}": t for i, p in enumerate(params) for n, t in p.named_parameters()}


def layer_loss(p: lin.LinearParams, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE, target): linearized vs softmax attention of one layer over one whole sequence."""
    q, k, v = q.float(), k.float(), v.float()
    N = q.shape[1]
    if target is None:
        with torch.no_grad():
            target = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                    enable_gqa=q.shape[0] != k.shape[0])[0]
    step = lin.plan_step(p.cfg, 0, torch.arange(N), None)
    y = lin.attend(p, q, k, v, step, lin.empty_sums(p, q.device), scale)
    return F.mse_loss(y, target), target


def _shard(path: Path, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(f"q.{i}"), f.get_tensor(f"k.{i}"), f.get_tensor(f"v.{i}")


@torch.no_grad()
def evaluate(params: list[lin.LinearParams], shards: list[Path], scale: float) -> dict:
    """Per layer, over the held-out shards: MSE and relative error ||lin - softmax|| / ||softmax||."""
    mse, err, ref = [0.0] * len(params), [0.0] * len(params), [0.0] * len(params)
    for path in shards:
        for i, p in enumerate(params):
            loss, target = layer_loss(p, *_shard(path, i), scale)
            mse[i] += loss.item() / len(shards)
            err[i] += loss.item() * target.numel()
            ref[i] += target.pow(2).sum().item()
    return {"mse": [round(m, 8) for m in mse],
            "rel_error": [round(math.sqrt(e / max(r, 1e-30)), 5) for e, r in zip(err, ref)]}


def train(cfg: LinearizeConfig, params: list[lin.LinearParams], shards: list[Path], scale: float) -> list[float]:
    """Every layer on every training chunk, --epochs passes, cosine-decayed AdamW; one step is
    one chunk for all layers (each layer's backward alone: memory of one layer). Returns the
    per-layer mean loss of the last pass."""
    all_params = [t for p in params for t in p.parameters()]
    opt = torch.optim.AdamW(all_params, lr=cfg.lr, weight_decay=0.0)
    tag = f"g{cfg.group}-f{cfg.features}-c{cfg.conv}-lr{cfg.lr:g}"
    state = cfg.work / f"train-state-{tag}.safetensors"
    total = len(shards) * cfg.epochs
    step, losses = 0, []
    if safetensors_whole(state):
        step, meta = load_state(state, named(params), opt)
        losses = json.loads(meta["losses"])
    bar = tqdm(total=total, initial=step, desc="train (all layers, one chunk a step)", unit="step")
    saved = time.monotonic()
    while step < total:
        epoch, j = divmod(step, len(shards))
        order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        path = shards[int(order[j])]
        for g in opt.param_groups:  # cosine decay, recomputed from the step so resuming is exact
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        opt.zero_grad()
        row = []
        for i, p in enumerate(params):
            loss, _ = layer_loss(p, *_shard(path, i), scale)
            loss.backward()
            row.append(loss.item())
        opt.step()
        step += 1
        losses.append(row)
        bar.set_postfix(loss=f"{sum(row) / len(row):.3g}")
        bar.update(1)
        if time.monotonic() - saved > CHECKPOINT_S or step == total:
            save_state(state, named(params), opt, step, {"losses": json.dumps(losses)})
            saved = time.monotonic()
    bar.close()
    last = losses[-len(shards):] if losses else []
    return [sum(r[i] for r in last) / len(last) for i in range(len(params))] if last else []
