"""Heads of every kind, made fresh or loaded from files: the one place that knows all the
kinds (`heads.py` holds the shared parts and Medusa's, `amphista.py` Amphista's)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from actors.amphista import AmphistaHeads
from actors.heads import (
    HEADS_WEIGHTS,
    DraftHeads,
    EmbeddingFromFiles,
    HeadsConfig,
    MedusaHeads,
    embedding_rows,
    output_rows,
    output_rows_from_files,
)

HEAD_CLASSES: dict[str, type[DraftHeads]] = {"medusa": MedusaHeads, "amphista": AmphistaHeads}


def make_heads(cfg: HeadsConfig, hot_ids: Tensor, hot_rows: Tensor) -> DraftHeads:
    """Fresh heads of `cfg.kind` (zero-initialised where it matters: they start as the lm_head)."""
    return HEAD_CLASSES[cfg.kind](cfg, hot_ids, hot_rows)


def load_heads(directory: Path, model, dtype: torch.dtype = torch.float32) -> DraftHeads:
    """Heads from `directory` on top of the target's output projection (and, for Amphista,
    its token embedding): `model` is the target Transformer, or the directory of its weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = HeadsConfig.read(directory)
    tensors = load_file(str(directory / HEADS_WEIGHTS))
    hot = tensors.pop("hot_ids").long()
    from_files = isinstance(model, (str, Path))
    rows = output_rows_from_files(model, hot) if from_files else output_rows(model, hot)
    heads = make_heads(cfg, hot, rows.to(dtype))
    params = heads.trained()
    if set(tensors) != set(params):
        raise ValueError(f"{directory / HEADS_WEIGHTS} holds {sorted(tensors)}; {cfg.kind} heads need {sorted(params)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    if heads.uses_token:
        heads.embed = EmbeddingFromFiles(model) if from_files else (lambda ids: embedding_rows(model, ids))
    return heads.to(dtype).eval().requires_grad_(False)
