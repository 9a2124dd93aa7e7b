"""One figure for the heads benchmark: what the heads learned, and what it bought.

    python -m benchmarks.heads_plot --heads actors/builtin_heads/qwen2.5-coder-1.5b/medusa \
        --report benchmarks/results/medusa/report.json --out benchmarks/results/medusa/heads.png

`--heads A,B`: several heads directories side by side (e.g. medusa and amphista).
Left: held-out per-head top-1 / top-5 accuracy (heads.json). Middle: tokens/s per method
(the bench's interleaved run). Right: accepted tokens per step and drafted tree nodes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", required=True, help="heads directories, comma-separated")
    p.add_argument("--report", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    heads = [json.loads((Path(h) / "heads.json").read_text()) for h in args.heads.split(",")]
    report = json.loads(Path(args.report).read_text())
    methods = report["methods"]

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    k = range(len(heads[0]["accuracy"]["top1"]))
    width = 0.8 / (2 * len(heads))
    for j, h in enumerate(heads):
        for m, metric in enumerate(("top1", "top5")):
            at = [i - 0.4 + width * (2 * j + m + 0.5) for i in k]
            ax1.bar(at, h["accuracy"][metric], width=width, label=f"{h['kind']} {metric.replace('top', 'top-')}")
    ax1.set_xticks(list(k), [f"head {i}\n(t+{i + 2})" for i in k])
    ax1.set_ylim(0, 1)
    ax1.set_title("held-out accuracy vs the target's argmax")
    ax1.legend()
    names = list(methods)
    rates = [methods[n]["tokens_per_s"] for n in names]
    ax2.bar(names, rates, color="tab:blue")
    ax2.tick_params(axis="x", labelrotation=20)
    for x, v in enumerate(rates):
        ax2.text(x, v, f"{v:.2f}", ha="center", va="bottom")
    ax2.set_title("tokens / s (interleaved, same prompts)")
    accepted = [methods[n]["mean_accepted"] or 1.0 for n in names]
    nodes = [methods[n].get("mean_tree_nodes", 0) for n in names]
    ax3.bar([i - 0.2 for i in range(len(names))], accepted, width=0.4, label="tokens per step", color="tab:green")
    ax3.bar([i + 0.2 for i in range(len(names))], nodes, width=0.4, label="drafted nodes per step", color="tab:gray")
    ax3.set_xticks(range(len(names)), names, rotation=20)
    ax3.set_title("per target forward")
    ax3.legend()
    c = report["config"]
    fig.suptitle(f"{c['target']} ({c['dtype']}), {c['limit']} prompts, {c['max_new_tokens']} new tokens, greedy")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
