"""Decoding-step time against context length: a linearized model versus its softmax base.

Both models have random weights of a real model's shape (the config only is read, no
weights), so no checkpoint is needed and nothing about quality is measured: only how a
one-token step's cost grows with the cache length. The linearized model shares every
weight of the base (the very same tensors) and adds its feature maps and convolution
(`Transformer.linearize`), so one model's weights are in memory.

Per context L the KV cache is filled with random keys/values at slots [0, L) (a step's
cost depends on the cache's length, not its contents; no prefill). The linear model's
first forward folds every group of that cache into its state (O(L), once: reported as
`first_ms`, not part of the step time); one warm-up step each; then `--steps` timed
one-token steps from L + 1, `--repeats` times (the cache cropped back in between), base
and linear interleaved (ABBA) because the machine is noisy. A timed window folds a new
group only where it crosses a group boundary (`folds` counts them; that cost is then in
the step time); `fold_ms`, one group folded on every layer alone, gives the amortized
cost at any `--steps`: linear_ms + fold_ms / group when the window folds nothing.

    python -m benchmarks.linear_steps --shape qwen2.5-coder-1.5b --contexts 1024,4096,16384 \
        --steps 16 --repeats 3 --dtype float32 --out benchmarks/results/linear/steps
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from actors import linear_attention as lin
from actors.layers import RMSNorm
from actors.model import Transformer
from actors.model_config import ModelConfig
from cluster.reporting import save_report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SLACK = 64  # cache slots past L + steps


def tiny_config() -> ModelConfig:
    return ModelConfig(family="qwen2", vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=16, intermediate_size=128, qkv_bias=True, max_position_embeddings=4096)


def shape_config(shape: str) -> ModelConfig:
    """The model config of `shape` ("tiny" or a model name), without its weights."""
    if shape == "tiny":
        return tiny_config()
    from actors.loading import read_config

    return ModelConfig.from_hf(read_config(shape))


# --------------------------------------------------------------------------- models


def _init_(module: nn.Module, gen: torch.Generator) -> None:
    """N(0, 0.02) everywhere; norm weights 1 (0 for Gemma's 1 + w norms)."""
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, RMSNorm):
                    p.fill_(0.0 if m.unit_offset else 1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)


def _materialize(model: Transformer, dtype: torch.dtype) -> Transformer:
    model.to(dtype).to_empty(device="cpu")  # uninitialised, already in the model dtype
    if model.config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings
    model._init_buffers("cpu")  # RoPE tables in fp32
    return model.eval()


def build_pair(config: ModelConfig, dtype: torch.dtype, linear: lin.LinearConfig,
               seed: int = 0) -> tuple[Transformer, Transformer]:
    """(base, linearized): random weights, every base tensor shared by the linearized model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        base = Transformer(dataclasses.replace(config))
    _materialize(base, dtype)
    _init_(base, gen)
    with torch.device("meta"):
        twin = Transformer(dataclasses.replace(config))  # its own config: linearize() edits it
    modules = dict(twin.named_modules())
    for name, p in base.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        setattr(modules[owner], leaf, p)
    twin._init_buffers("cpu")
    bad = [n for n, p in twin.named_parameters() if p.device.type == "meta"]
    if bad:
        raise RuntimeError(f"parameters not shared with the base: {bad[:5]}")
    for p in twin.linearize(linear):
        _init_(p, gen)
    return base, twin.eval()


def fill_cache(model: Transformer, length: int, max_len: int, gen: torch.Generator, source=None):
    """A cache of `max_len` slots holding random K/V at [0, length) (copied from `source` if given)."""
    cache = model.new_cache(max_len)
    for i in range(cache.n_layers):
        for dst, src in ((cache.k, source.k if source is not None else None),
                         (cache.v, source.v if source is not None else None)):
            if src is None:
                dst[i, 0, :, :length].normal_(generator=gen)
            else:
                dst[i, 0, :, :length].copy_(src[i, 0, :, :length])
    cache.length = length
    return cache


def time_window(model: Transformer, cache, start: int, tokens: list[int]) -> float:
    """Mean ms of one-token steps from cache length `start` (the cache is cropped there first)."""
    cache.crop(start)
    t0 = time.perf_counter()
    for tok in tokens:
        model(torch.tensor([tok]), cache, last_only=True)
    return 1e3 * (time.perf_counter() - t0) / len(tokens)


def time_fold(model: Transformer, cache, lo: int, repeats: int) -> float:
    """Ms to fold one group of slots [lo, lo + group) into every linear layer's sums."""
    params = [(i, blk.attn.linear) for i, blk in enumerate(model.layers) if blk.attn.linear is not None]
    group = model.config.linear.group
    sums = [lin.empty_sums(p, model.device) for _, p in params]
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            for (i, p), s in zip(params, sums):
                lin.fold_group(p, s, cache.k[i, 0, :, lo:lo + group], cache.v[i, 0, :, lo:lo + group])
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def warm_up(model: Transformer, group: int, gen: torch.Generator, steps: int = 4) -> None:
    """A few steps across a group boundary on a small cache."""
    cache = fill_cache(model, group - steps // 2, group + steps + SLACK, gen)
    time_window(model, cache, cache.length, torch.randint(model.config.vocab_size, (steps,), generator=gen).tolist())


def folds_in(start: int, steps: int, group: int) -> int:
    """Group boundaries crossed by the forwards starting at start .. start + steps - 1 (the
    first forward's boundary is already folded)."""
    return (start + steps - 1) // group - start // group


# --------------------------------------------------------------------------- run


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def parse_contexts(text: str) -> list[int]:
    try:
        contexts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--contexts takes comma-separated token counts, e.g. 1024,4096; got {text!r}") from None
    if not contexts or min(contexts) < 1 or len(set(contexts)) != len(contexts):
        raise ValueError(f"--contexts needs distinct positive token counts, got {text!r}")
    return sorted(contexts)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    contexts = parse_contexts(args.contexts)
    if args.steps < 1 or args.repeats < 1:
        raise ValueError("--steps and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = shape_config(args.shape)
    if max(contexts) + args.steps + SLACK > config.max_position_embeddings:
        print(f"note: contexts run past the model's {config.max_position_embeddings} positions (RoPE extrapolates; "
              f"the timing is unaffected)", file=sys.stderr)
    dtype = DTYPES[args.dtype]
    lcfg = lin.LinearConfig(group=args.group, features=args.features, conv=args.conv)
    load_before = os.getloadavg()
    base, linear = build_pair(config, dtype, lcfg, args.seed)
    tune = args.tune if args.tune is not None else args.shape != "tiny"
    if tune:
        base.tune_kernels(progress=True)
        linear.tune_kernels()  # same shapes: from the per-CPU cache
    models = {"base": base, "linear": linear}
    for model in models.values():  # first calls (allocator, kernels, a fold) out of the first context's figures
        warm_up(model, lcfg.group, torch.Generator().manual_seed(args.seed))
    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = config.vocab_size

    rows: dict[str, dict] = {}
    bar = tqdm(total=len(contexts) * (2 + 2 * args.repeats), desc="linear steps", unit="run", file=sys.stderr)
    for L in contexts:
        bar.set_postfix(context=L)
        max_len = L + args.steps + SLACK
        caches = {"base": fill_cache(base, L, max_len, gen)}
        caches["linear"] = fill_cache(linear, L, max_len, gen, source=caches["base"])
        tokens = torch.randint(vocab, (args.steps + 1,), generator=gen).tolist()
        first = {}
        for name in ("base", "linear"):  # the first step: the linear model folds all of [0, L) here
            t0 = time.perf_counter()
            logits = models[name](torch.tensor([tokens[0]]), caches[name], last_only=True)
            first[name] = 1e3 * (time.perf_counter() - t0)
            if not torch.isfinite(logits).all():
                raise RuntimeError(f"{name} model: non-finite logits at context {L}")
            bar.update()
        for name in ("base", "linear"):  # warm-up of the steady state (discarded)
            time_window(models[name], caches[name], L + 1, tokens[1:2])
        runs: dict[str, list[float]] = {"base": [], "linear": []}
        for r in range(args.repeats):
            for name in (("base", "linear") if r % 2 == 0 else ("linear", "base")):
                runs[name].append(time_window(models[name], caches[name], L + 1, tokens[1:]))
                bar.update()
        fold_ms = None  # one whole group below L folded alone (none when L < group)
        if L >= lcfg.group:
            fold_ms = time_fold(linear, caches["linear"], (L // lcfg.group - 1) * lcfg.group, args.repeats)
        base_ms, linear_ms = statistics.median(runs["base"]), statistics.median(runs["linear"])
        rows[str(L)] = {"base_ms": round(base_ms, 3), "linear_ms": round(linear_ms, 3),
                        "linear_over_base": round(linear_ms / base_ms, 4),
                        "base_runs_ms": [round(t, 3) for t in runs["base"]],
                        "linear_runs_ms": [round(t, 3) for t in runs["linear"]],
                        "base_first_ms": round(first["base"], 3), "linear_first_ms": round(first["linear"], 3),
                        "folds": folds_in(L + 1, args.steps, lcfg.group),
                        "fold_ms": round(fold_ms, 3) if fold_ms is not None else None}
        del caches
    bar.close()
    f0 = rows[str(contexts[0])]
    for L in contexts:
        r = rows[str(L)]
        r["base_vs_first"] = round(r["base_ms"] / f0["base_ms"], 4)
        r["linear_vs_first"] = round(r["linear_ms"] / f0["linear_ms"], 4)
    last = rows[str(contexts[-1])]
    a, b = label(contexts[-1]), label(contexts[0])
    flat = {"first": contexts[0], "last": contexts[-1],
            f"linear_{a}_over_{b}": last["linear_vs_first"], f"base_{a}_over_{b}": last["base_vs_first"]}
    report = {
        "config": {"shape": args.shape, "dtype": args.dtype, "contexts": contexts, "steps": args.steps,
                   "repeats": args.repeats, "seed": args.seed, "linear": lcfg.to_dict(), "tuned_kernels": tune,
                   "model": {k: v for k, v in dataclasses.asdict(config).items() if k != "layer_types"},
                   "machine": {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "python": platform.python_version(), "platform": platform.platform(),
                               "loadavg_before": [round(x, 2) for x in load_before],
                               "loadavg_after": [round(x, 2) for x in os.getloadavg()]}},
        "contexts": rows,
        "flat": flat,
    }
    save_report(args.out, report, render_markdown, plot)
    return report


# --------------------------------------------------------------------------- report


def render_markdown(report: dict) -> str:
    c, m = report["config"], report["config"]["machine"]
    lc = c["linear"]
    lines = [f"# Decoding step vs context: linearized vs softmax base ({c['shape']}, {c['dtype']}, random weights)",
             "",
             f"{c['steps']} one-token steps from context L + 1, median over {c['repeats']} repeats, base and "
             f"linear interleaved; linear: group {lc['group']}, {lc['features']} features, conv {lc['conv']}. "
             f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}; load average {m['loadavg_before'][0]} "
             f"before, {m['loadavg_after'][0]} after{'; kernels tuned' if c['tuned_kernels'] else ''}.",
             "",
             "| context | base ms | linear ms | linear / base | base vs first | linear vs first | "
             "first step ms (base / linear) | folds in window | fold ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for L, r in report["contexts"].items():
        lines.append(f"| {L} | {r['base_ms']:.2f} | {r['linear_ms']:.2f} | {r['linear_over_base']:.3f} | "
                     f"{r['base_vs_first']:.3f} | {r['linear_vs_first']:.3f} | "
                     f"{r['base_first_ms']:.1f} / {r['linear_first_ms']:.1f} | {r['folds']} | {r['fold_ms']} |")
    f = report["flat"]
    rest = {k: v for k, v in f.items() if k not in ("first", "last")}
    lines += ["", "Step at the longest context over the shortest: "
              + ", ".join(f"{k} = {v:.3f}" for k, v in rest.items()) + ".",
              "",
              "first step: the linear model folds all of [0, L) into its state there (once per cache). "
              "fold ms: one group folded on every layer; a window without folds omits it, amortized it adds "
              f"fold ms / {lc['group']} per step.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [int(c) for c in report["contexts"]]
    rows = [report["contexts"][str(c)] for c in contexts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("base", "linear"):
        ax1.plot(contexts, [r[f"{name}_ms"] for r in rows], marker="o", label=name)
        ax2.plot(contexts, [r[f"{name}_vs_first"] for r in rows], marker="o", label=name)
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax, title in ((ax1, "ms per one-token step"), (ax2, "step / step at the shortest context")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(f"{c['shape']} ({c['dtype']}, random weights): linearized vs softmax decoding step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-coder-1.5b", help="a model name (its config only is read) or 'tiny'")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--group", type=int, default=lin.LinearConfig.group)
    p.add_argument("--features", type=int, default=lin.LinearConfig.features)
    p.add_argument("--conv", type=int, default=lin.LinearConfig.conv)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="tune the linear kernels first (cached per CPU; default: yes, except for --shape tiny)")
    p.add_argument("--out", default="benchmarks/results/linear/steps")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
