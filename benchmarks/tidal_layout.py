"""Where should a TidalDecode model re-select its positions? Measured, not guessed.

    python -m benchmarks.tidal_layout --model qwen2.5-coder-1.5b --context 4096 --budget 256 \
        --out benchmarks/results/tidal/layout-1.5b.json

On a long needle prompt (`cluster.long_prompts`), prefill all but the last `--queries`
tokens, then run those tokens with every layer recording its full attention weights. For
each layer l and each layer s, `captured[l][s]` is the share of l's attention mass that
falls on the `budget` positions s would select (plus the new tokens, which sparse layers
always see). A layout (select at 2, re-select at r) serves each sparse layer with the most
recent selection before it; the best r maximises the mean captured mass over sparse layers.

Attention mass is not retrieval: `--layouts` also decodes each prompt with the target
attending sparsely (TidalDecode's own mode) under each candidate layout, and counts the
needles found. The prompts use `--seed 1` by default, so nothing is tuned on bench-long's
own prompts (seed 0). The result is the default layout in `actors.tidal.MEASURED_RESELECT`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import actors.tidal as tidal
from actors import loading
from actors.runner import ModelRunner
from cluster.engine import encode_prompt
from cluster.local import DecodeConfig, autoregressive_generate
from cluster.long_prompts import needle_found, needle_prompts


def record_weights(model, runner: ModelRunner, queries: list[int], budget: int) -> list[torch.Tensor]:
    """Per layer, the attention weights [n_kv, g*T, end] of `queries` run as new tokens."""
    n_layers = model.config.n_layers
    weights: list[torch.Tensor] = []
    real = tidal.attend_select

    def spy(q, kc, vc, end, step, scale):
        scores = torch.matmul(q, kc[:, :end].transpose(1, 2)).float() * scale
        if step.new_mask is not None:
            scores[:, :, step.start:].masked_fill_(~step.new_mask, float("-inf"))
        weights.append(torch.softmax(scores, dim=-1))
        return real(q, kc, vc, end, step, scale)

    everywhere = tidal.TidalConfig(budget, (), tuple(range(n_layers)))  # every layer attends fully and selects
    import actors.layers as model_module

    model_module.attend_select = spy
    try:
        model.forward_hidden(torch.tensor(queries), runner.cache, sparse=everywhere)
    finally:
        model_module.attend_select = real
    return weights


def capture_matrix(weights: list[torch.Tensor], start: int, budget: int) -> list[list[float]]:
    """captured[l][s]: mean over KV heads and query rows of l's mass on s's selection + new tokens."""
    selections = [w[:, :, :start].sum(1).topk(budget, dim=-1).indices for w in weights]  # [n_kv, budget]
    out = []
    for w in weights:
        new_mass = w[:, :, start:].sum(-1)  # [n_kv, rows]
        row = []
        for sel in selections:
            picked = torch.gather(w[:, :, :start], 2, sel[:, None, :].expand(-1, w.shape[1], -1)).sum(-1)
            row.append(float((picked + new_mass).mean()))
        out.append(row)
    return out


def needles_found(loaded, runner: ModelRunner, ids: list[int], answer: str, layouts: list[tuple[int, ...]],
                  budgets: list[int]) -> dict[str, bool]:
    """Decode `ids` with full attention, then with the target attending sparsely per layout
    and budget (one prefill, restored for each); whether each answer holds the needle."""
    cfg = DecodeConfig(max_new_tokens=24, eos_token_ids=tuple(loading.eos_token_ids(loaded)))
    runner.reset(len(ids) + cfg.max_new_tokens + 1)
    runner.prefill(ids)
    snap = runner.snapshot()
    out = {}
    for name, sparse in [("full", None)] + [(f"{b}@{','.join(map(str, lay))}",
                                             tidal.TidalConfig(b, tuple(range(lay[0])), lay))
                                            for lay in layouts for b in budgets]:
        runner.restore(snap)
        runner.attention = sparse
        text = loaded.tokenizer.decode(autoregressive_generate(runner, ids, cfg).token_ids, skip_special_tokens=True)
        out[name] = needle_found(answer, text)
    runner.attention = None
    return out


def layout_score(captured: list[list[float]], selects: tuple[int, ...], full: tuple[int, ...]) -> float:
    """Mean captured mass over the sparse layers of a layout."""
    scores = []
    for layer in range(len(captured)):
        if layer in selects or layer in full or layer < selects[0]:
            continue
        source = max(s for s in selects if s < layer)
        scores.append(captured[layer][source])
    return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--budget", type=int, default=tidal.DEFAULT_BUDGET)
    p.add_argument("--queries", type=int, default=16, help="prompt tokens run as new tokens (the measured rows)")
    p.add_argument("--depths", default="0.2,0.5,0.8", help="needle depths: one prompt each")
    p.add_argument("--seed", type=int, default=1, help="prompt seed (bench-long's prompts are seed 0)")
    p.add_argument("--layouts", default="", help="selection layers to decode with, e.g. '2;2,4;2,11' (';' between)")
    p.add_argument("--budgets", default="", help="budgets to decode with (default: --budget)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    loaded = loading.load(args.model, args.dtype, progress=True)
    model = loaded.build()
    runner = ModelRunner(model, args.context + 64)
    n_layers = model.config.n_layers
    prompts = needle_prompts(loaded.tokenizer, args.context, [float(d) for d in args.depths.split(",")], args.seed)
    layouts = [tuple(int(x) for x in lay.split(",")) for lay in args.layouts.split(";") if lay]
    budgets = [int(b) for b in args.budgets.split(",") if b] or [args.budget]
    found: dict[str, int] = {}
    mean = [[0.0] * n_layers for _ in range(n_layers)]
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(loaded.tokenizer, prompt.text, chat=True)
        print(f"prompt {i + 1}/{len(prompts)}: prefilling {len(ids)} tokens", flush=True)
        runner.reset(len(ids) + 1)
        runner.prefill(ids[:-args.queries])
        weights = record_weights(model, runner, ids[-args.queries:], args.budget)
        captured = capture_matrix(weights, len(ids) - args.queries, args.budget)
        for l_ in range(n_layers):
            for s in range(n_layers):
                mean[l_][s] += captured[l_][s] / len(prompts)
        if layouts:
            found_here = needles_found(loaded, runner, ids, prompt.answer, layouts, budgets)
            for name, ok in found_here.items():
                found[name] = found.get(name, 0) + ok
            print("  needle found: " + ", ".join(f"{k} {int(v)}" for k, v in found_here.items()), flush=True)
    full = (0, 1)
    single = layout_score(mean, (2,), full)
    by_reselect = {r: layout_score(mean, (2, r), full) for r in range(3, n_layers - 1)}
    best = max(by_reselect, key=by_reselect.get)
    own = sum(mean[layer][layer] for layer in range(3, n_layers)) / (n_layers - 3)  # each layer picking for itself
    report = {"model": args.model, "context": args.context, "budget": args.budget, "prompts": len(prompts),
              "queries": args.queries, "select_only_2": round(single, 4),
              "by_reselect": {r: round(v, 4) for r, v in by_reselect.items()}, "best_reselect": best,
              "paper_rule_reselect": round(n_layers * 13 / 32),
              "oracle_each_layer_selects": round(own, 4), "needles_found": found,
              "captured": [[round(v, 4) for v in r] for r in mean]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{args.model}: captured attention mass, select at 2 only: {single:.3f}; best re-select layer {best}: "
          f"{by_reselect[best]:.3f}; paper's proportional rule (layer {report['paper_rule_reselect']}): "
          f"{by_reselect.get(report['paper_rule_reselect'], float('nan')):.3f}; every layer selecting for itself: "
          f"{own:.3f}")
    plot(report, out.with_suffix(".png"))
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rs = [int(r) for r in report["by_reselect"]]
    ax1.plot(rs, list(report["by_reselect"].values()), marker="o")
    ax1.axhline(report["select_only_2"], ls="--", color="gray", label="select at 2 only")
    ax1.axhline(report["oracle_each_layer_selects"], ls=":", color="green", label="each layer selects (oracle)")
    ax1.set_xlabel("re-selection layer")
    ax1.set_ylabel("attention mass kept, mean over sparse layers")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{report['model']}: budget {report['budget']} at {report['context']} tokens")
    im = ax2.imshow(report["captured"], vmin=0, vmax=1, cmap="viridis")
    ax2.set_xlabel("selecting layer s")
    ax2.set_ylabel("attending layer l")
    ax2.set_title("mass of l on s's selection")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
