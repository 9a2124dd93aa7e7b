"""`specray linearize`: attention transfer into linearized attention (actors/linear_attention.py).

The base model stays frozen. Every layer's new parameters (feature maps, gain, convolution)
learn, independently of the other layers, to reproduce that layer's softmax attention
output from its true inputs (teacher forcing). Stages, each cached under the work
directory and resumed where it stopped (Ctrl-C is safe at any point):

  1. chunks   Python standard-library sources and the Python reference docs
              (`pydoc_data.topics`), tokenized and cut into --seq-token chunks, up to
              --tokens; every 10th file / topic is held out (never trained on) and listed,
              so quality benchmarks can measure on held-out text only
  2. capture  one forward per chunk: every layer's post-RoPE q, k, v (bf16 shards)
  3. train    AdamW on MSE(linearized attention, softmax attention) per layer, fp32,
              checkpointed with the optimizer state
  4. write    DIR/linear.json (config + metadata) and DIR/linear.safetensors (bf16)
The stages live in training/linear_text.py (1) and training/linear_transfer.py (2, 3); the
settings in training/config.py. This module is the command: it checks the model and the
work directory, runs the stages in order and writes the result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from actors import linear_attention as lin
from actors.paths import durable_replace, safetensors_whole
from training.checkpoint import add_time, atomic_json
from training.config import LinearizeConfig
from training.linear_text import build_chunks
from training.linear_transfer import capture, evaluate, named, new_params, train


def _base_name(model: str) -> str:
    from actors.loading import BUILTINS

    if model in BUILTINS:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def run(cfg: LinearizeConfig) -> dict:
    from safetensors.torch import save_file

    from actors import hardware, loading
    from actors.model_config import ModelConfig

    if loading.linear_dir(cfg.model) is not None:
        raise ValueError(f"linearize --model {cfg.model!r} is linearized already; give its base model")
    loading.resolve(cfg.model)  # a bad name fails here, before anything loads
    cfg.work.mkdir(parents=True, exist_ok=True)
    data_key = {"model": _base_name(cfg.model), "tokens": cfg.tokens, "seq": cfg.seq, "seed": cfg.seed}
    key_path = cfg.work / "data.json"
    if key_path.is_file() and json.loads(key_path.read_text()) != data_key:
        raise ValueError(f"work directory {cfg.work} holds data of another run ({key_path.read_text()}); "
                         "give another --work or remove it")
    atomic_json(key_path, data_key)
    mc = ModelConfig.from_hf(loading.read_config(cfg.model))
    if "sliding_attention" in mc.layer_types:
        raise ValueError(f"linearizing {mc.family} models with sliding-window layers is not supported")
    lcfg = cfg.linear_config()
    lcfg.linear_layers(mc.n_layers)
    torch.manual_seed(cfg.seed)
    clock = time.perf_counter()

    def lap(stage: str) -> dict:
        nonlocal clock
        times = add_time(cfg.work, stage, time.perf_counter() - clock)
        clock = time.perf_counter()
        return times

    tokenizer = loading.load_tokenizer(cfg.model)
    chunks = build_chunks(cfg, tokenizer)
    lap("chunks")
    if not chunks["train"] or not chunks["heldout"]:
        raise ValueError(f"not enough text for one --seq {cfg.seq} chunk of each split")
    done = all(safetensors_whole(cfg.work / f"cap-{s}-{j:04d}.safetensors")
               for s in ("train", "heldout") for j in range(len(chunks[s])))
    shards = {s: [cfg.work / f"cap-{s}-{j:04d}.safetensors" for j in range(len(chunks[s]))]
              for s in ("train", "heldout")}
    if not done:
        dtype = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
        loaded = loading.load(cfg.model, dtype)
        if loaded.hf_model is None:
            raise ValueError(f"linearize needs a dense model; {cfg.model!r} loaded as {loaded.precision}")
        model = loaded.build()
        model.tune_kernels(progress=True)
        lap("load")
        shards = capture(model, chunks, cfg.work)
        del model, loaded
        lap("capture")
    params = new_params(lcfg, mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.head_dim)
    scale = mc.attn_scale
    init_path = cfg.work / f"eval-initial-g{cfg.group}-f{cfg.features}-c{cfg.conv}.json"
    if init_path.is_file():
        initial = json.loads(init_path.read_text())
    else:
        initial = evaluate(params, shards["heldout"], scale)
        atomic_json(init_path, initial)
    train_loss = train(cfg, params, shards["train"], scale)
    lap("train")
    final = evaluate(params, shards["heldout"], scale)
    times = lap("evaluate")
    meta = {"base": _base_name(cfg.model), **lcfg.to_dict(),
            "tokens": len(chunks["train"]) * cfg.seq, "seq": cfg.seq, "epochs": cfg.epochs, "lr": cfg.lr,
            "seed": cfg.seed, "train_chunks": len(chunks["train"]), "heldout_chunks": len(chunks["heldout"]),
            "train_loss": [round(x, 8) for x in train_loss],
            "heldout_initial": initial, "heldout_final": final,
            "minutes": {k: round(v / 60, 2) for k, v in times.items()},
            "heldout_docs": chunks["heldout_docs"]}
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out / (lin.LINEAR_FILE + ".tmp")
    save_file({k: t.detach().to(torch.bfloat16).contiguous() for k, t in named(params).items()}, str(tmp),
              metadata={"base": meta["base"]})
    durable_replace(tmp, cfg.out / lin.LINEAR_FILE)
    atomic_json(cfg.out / lin.LINEAR_CONFIG, meta)
    for i in range(mc.n_layers):
        print(f"layer {i:2d}: held-out mse {initial['mse'][i]:.3g} -> {final['mse'][i]:.3g}, "
              f"relative error {initial['rel_error'][i]:.3f} -> {final['rel_error'][i]:.3f}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"mean relative error {mean(initial['rel_error']):.3f} -> {mean(final['rel_error']):.3f} over "
          f"{len(chunks['heldout'])} held-out chunks; {meta['tokens']} training tokens, {cfg.epochs} epochs; "
          f"minutes {meta['minutes']}; wrote {cfg.out}")
    return meta
