"""Stages 3 and 4 of `specray train-heads`: the target's hidden states and top-8 labels,
prefilled once per chunk into shards, and the hot vocabulary the heads predict over.

Apart from the training loop because this is the only stage that runs the target: after
it the 1.5B can go, and every epoch, resumed run or other kind of heads in the same work
directory reads the very same shards instead of the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from actors.heads import embedding_rows
from actors.paths import durable_replace, safetensors_whole

TOP = 8  # labels kept per position: the target's 8 likeliest next tokens


# ---- 3. features ----------------------------------------------------------------------------


def _shards(chunks: list[list[int]], per_shard: int = 8192) -> list[list[int]]:
    """Chunk indices grouped into shards of about `per_shard` tokens."""
    shards, cur, n = [], [], 0
    for i, c in enumerate(chunks):
        cur.append(i)
        n += len(c)
        if n >= per_shard:
            shards.append(cur)
            cur, n = [], 0
    if cur:
        shards.append(cur)
    return shards


def extract_features(model, chunks: dict, work: Path) -> dict[str, list[Path]]:
    """Prefill every chunk once; write hidden states and top-8 labels shard by shard."""
    from safetensors.torch import save_file

    out: dict[str, list[Path]] = {}
    plan = [(split, i, idx) for split in ("train", "heldout") for i, idx in enumerate(_shards(chunks[split]))]
    total = sum(len(chunks[s][j]) for s, _, idx in plan for j in idx)
    bar = tqdm(total=total, desc="features (target prefill)", unit="tok", unit_scale=True)
    cache = model.new_cache(max(len(c) for s in ("train", "heldout") for c in chunks[s]))
    for split, i, idx in plan:
        path = work / f"feat-{split}-{i:04d}.safetensors"
        out.setdefault(split, []).append(path)
        n_tok = sum(len(chunks[split][j]) for j in idx)
        if safetensors_whole(path):
            bar.update(n_tok)
            continue
        hidden, top_ids, top_p, lengths = [], [], [], []
        for j in idx:
            ids = torch.tensor(chunks[split][j])
            cache.crop(0)
            h = model.forward_hidden(ids, cache)
            p, t = torch.softmax(model.logits(h), -1).topk(TOP, dim=-1)
            hidden.append(h.to(torch.bfloat16))
            top_ids.append(t.to(torch.int32))
            top_p.append(p.to(torch.float16))
            lengths.append(len(ids))
            bar.update(len(ids))
        tmp = path.with_suffix(".tmp")
        save_file({"hidden": torch.cat(hidden), "top_ids": torch.cat(top_ids), "top_p": torch.cat(top_p),
                   "lengths": torch.tensor(lengths, dtype=torch.int64)}, str(tmp))
        durable_replace(tmp, path)
    bar.close()
    return out


def load_shards(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    parts = [load_file(str(p)) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def attach_tokens(data: dict, chunks: list[list[int]], model) -> None:
    """Token ids aligned with the feature rows (the shards keep the chunks' order) and the
    target's embedding rows of every distinct one: what Amphista's heads read as token t+1."""
    ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
    if ids.numel() != data["hidden"].shape[0]:
        raise ValueError(f"features hold {data['hidden'].shape[0]} positions but the chunks {ids.numel()} tokens: "
                         "the work directory mixes runs; remove its feat-*.safetensors")
    distinct = ids.unique()
    data["ids"] = ids
    data["embed_index"] = torch.full((int(distinct.max()) + 1,), -1, dtype=torch.long)
    data["embed_index"][distinct] = torch.arange(distinct.numel())
    with torch.no_grad():
        data["embed_rows"] = torch.cat([embedding_rows(model, distinct[i:i + 4096])
                                        for i in range(0, distinct.numel(), 4096)])


# ---- 4. hot vocabulary ----------------------------------------------------------------------


def hot_vocabulary(top_ids: torch.Tensor, vocab_size: int, size: int) -> torch.Tensor:
    """The `size` tokens the target ranks first most often (then anywhere in its top 8),
    ties to the lower id: sorted full-vocab ids, long [size]."""
    score = torch.bincount(top_ids[:, 0].long(), minlength=vocab_size).double() * TOP
    score += torch.bincount(top_ids.flatten().long(), minlength=vocab_size).double()
    ids = torch.arange(vocab_size, dtype=torch.double)  # ties: the lower id ranks higher
    return torch.argsort(score * (vocab_size + 1) - ids, descending=True)[:size].sort().values
