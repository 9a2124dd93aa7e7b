"""`specray train-heads`: Medusa or Amphista heads by self-distillation, on this machine's CPU.

The target stays frozen and supplies both the inputs (its last hidden states) and the
labels (its own top-8 next-token distribution at each position), so the heads learn what
the target would say, not what the text says. Stages, each cached under the work
directory and resumed where it stopped (Ctrl-C is safe at any point):

  1. answers   the target's own greedy answers to Spec-Bench prompts (batched generate),
               minus the categories the benchmarks decode (coding, math, math_reasoning)
  2. chunks    those answers plus Python standard-library sources, tokenized and cut into
               chunks, up to --tokens; every 20th chunk is held out for evaluation
  3. features  one target prefill per chunk: hidden states (bf16) and the top-8 labels,
               written in shards
  4. hot vocab the tokens the target predicts most often on the training shards
  5. train     AdamW over all heads at once, checkpointed (safetensors) every 50 steps;
               stages 1-4 do not depend on the kind, so Medusa and Amphista heads trained
               in one work directory see the very same data and labels
  6. evaluate  per-head top-1 / top-5 accuracy against the target's argmax, held out

Head k at position t learns the target's distribution at position t+k+1, i.e. its guess
at token t+k+2, seeing h_t (and, for Amphista, the embedding of token t+1).

The stages live in training/heads_data.py (1, 2), training/heads_features.py (3, 4) and
training/heads_fit.py (5, 6); the settings in training/config.py. This module is the
command: it loads the target, runs the stages in order and writes the heads with their
accuracy report.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from actors.head_kinds import make_heads
from actors.heads import HeadsConfig, output_rows
from training.checkpoint import add_time
from training.config import TrainConfig
from training.heads_data import build_chunks, generate_answers
from training.heads_features import attach_tokens, extract_features, hot_vocabulary, load_shards
from training.heads_fit import evaluate, train


def run(cfg: TrainConfig) -> dict:
    from actors import hardware, loading

    cfg.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = time.perf_counter()
    dtype = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
    target = loading.load(cfg.target, dtype)
    if target.hf_model is None:
        raise ValueError(f"train-heads needs a dense target; {cfg.target!r} loaded as {target.precision}")
    model = target.build()
    model.tune_kernels(progress=True)

    def lap(stage: str) -> None:
        nonlocal clock
        add_time(cfg.work, stage, time.perf_counter() - clock)
        clock = time.perf_counter()

    lap("load")
    generate_answers(cfg, target.hf_model, target.tokenizer)
    lap("answers")
    chunks = build_chunks(cfg, target.tokenizer)
    shards = extract_features(model, chunks, cfg.work)
    lap("features")
    train_data, heldout = load_shards(shards["train"]), load_shards(shards["heldout"])
    heads_cfg = HeadsConfig(cfg.kind, cfg.target, model.config.hidden_size, model.config.vocab_size,
                            n_heads=cfg.heads, hot_vocab=min(cfg.hot_vocab, model.config.vocab_size), width=cfg.width)
    hot = hot_vocabulary(train_data["top_ids"], heads_cfg.vocab_size, heads_cfg.hot_vocab)
    heads = make_heads(heads_cfg, hot, output_rows(model, hot))
    if heads.uses_token:
        attach_tokens(train_data, chunks["train"], model)
        attach_tokens(heldout, chunks["heldout"], model)
    del target, model  # the heads keep their own copy of the hot rows; the 1.5B can go
    train(cfg, heads, train_data)
    lap(f"train-{cfg.kind}")
    acc = evaluate(heads, heldout)
    times = add_time(cfg.work, f"evaluate-{cfg.kind}", time.perf_counter() - clock)
    times = {k: v for k, v in times.items() if "-" not in k or k.endswith(f"-{cfg.kind}")}  # not the other kinds'
    coverage = float(torch.isin(heldout["top_ids"][:, 0].long(), heads.hot_ids).float().mean())
    heads.cfg.accuracy = {**acc, "hot_coverage": round(coverage, 4),
                          "train_tokens": int(train_data["lengths"].sum()),
                          "heldout_tokens": int(heldout["lengths"].sum()),
                          "minutes": round(sum(times.values()) / 60, 1), "stage_seconds": times,
                          "config": {
                              k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                              if k not in ("out", "work")}}
    heads.save(cfg.out)
    for k in range(cfg.heads):
        print(f"head {k}: top-1 {acc['top1'][k]:.3f}  top-5 {acc['top5'][k]:.3f}  "
              f"({acc['positions'][k]} held-out positions)")
    print(f"hot vocabulary {heads_cfg.hot_vocab} covers {coverage:.3f} of the target's held-out argmaxes; "
          f"wrote {cfg.out}")
    return heads.cfg.accuracy
