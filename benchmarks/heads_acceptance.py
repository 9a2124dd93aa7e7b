"""Accepted tokens per step against tree size, for several heads, on the target's own answers.

    python -m benchmarks.heads_acceptance --heads medusa,amphista --limit 20 \
        --prompts benchmarks/prompts/spec_bench_coding_math.jsonl --out benchmarks/results/amphista/acceptance

What a verify would accept does not depend on time, so this measures it without decoding:
the target (bf16 where native) answers each prompt greedily (batched transformers
`generate`), one prefill of prompt + answer gives its hidden state and argmax at every
position, and at each answer position each heads' static and dynamic trees of exactly N
nodes (no cost cut) are walked against what the target would commit: a node is accepted
when its token is the answer's next token and the target's own argmax there. Reports
tokens per step (accepted + 1) per heads, tree kind and N, and per-head top-1 on these
answers; a plot of tokens per step against N.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

SIZES = (1, 2, 4, 8, 16, 32, 64)


def accepted(parents: list[int], tokens: list[int], answer: list[int], argmax: list[int], t: int) -> int:
    """Depth the target accepts: the tree's root is token t+1; follow children matching the
    answer where the target's argmax agrees."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        if p >= 0:
            children.setdefault(p, []).append(i)
    node, depth = 0, 0
    while True:
        at = t + 1 + depth  # the target's prediction after this node's token
        if at + 1 >= len(answer):
            return depth
        want = answer[at + 1]
        if argmax[at] != want:
            return depth
        nxt = next((c for c in children.get(node, []) if tokens[c] == want), None)
        if nxt is None:
            return depth
        node, depth = nxt, depth + 1


def answers(target, prompts: list[list[int]], new_tokens: int, batch: int = 10) -> list[list[int]]:
    model, eos = target.hf_model, set(target.tokenizer.all_special_ids)
    pad, out = target.tokenizer.pad_token_id or 0, []
    for i in tqdm(range(0, len(prompts), batch), desc="target answers", unit="batch"):
        rows = prompts[i:i + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            cut = next((j for j, tok in enumerate(row) if tok in eos), len(row))
            out.append(row[:cut])
    return out


def main(argv: list[str] | None = None) -> dict:
    from actors import hardware, loading
    from actors.head_kinds import load_heads
    from actors.heads import resolve_heads
    from cluster.bench import load_prompts
    from cluster.engine import encode_prompt
    from decoding.head_tree import dynamic_tree, static_shape

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--heads", default="medusa,amphista", help="built-in names or directories, comma-separated")
    p.add_argument("--prompts", default="benchmarks/prompts/spec_bench_coding_math.jsonl")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", required=True, help="directory for acceptance.json and acceptance.png")
    args = p.parse_args(argv)
    dtype = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
    target = loading.load(args.target, dtype)
    model = target.build()
    prompts = [encode_prompt(target.tokenizer, text, True) for text in load_prompts(args.prompts, args.limit)]
    replies = answers(target, prompts, args.max_new_tokens)
    heads = {name: load_heads(resolve_heads(name, args.target), model) for name in args.heads.split(",")}
    shapes = {name: {n: static_shape(h.cfg.accuracy["rank_accuracy"], n) for n in SIZES} for name, h in heads.items()}
    steps = 0
    total = {f"{name}-{kind}": {n: 0 for n in SIZES} for name in heads for kind in ("static", "dynamic")}
    top1 = {name: [0] * h.n_heads for name, h in heads.items()}
    seen = [0] * max(h.n_heads for h in heads.values())
    for prompt, reply in tqdm(list(zip(prompts, replies)), desc="trees", unit="prompt"):
        seq = prompt + reply
        cache = model.new_cache(len(seq) + 8)
        with torch.inference_mode():
            hidden = model.forward_hidden(torch.tensor(seq), cache)
            argmax = model.logits(hidden).argmax(-1).tolist()
        for t in range(len(prompt) - 1, len(seq) - 2):  # h_t predicted token t+1 (committed): draft from it
            steps += 1
            for k in range(len(seen)):
                seen[k] += t + k + 2 < len(seq)
            for name, h in heads.items():
                ids, probs = h.top(hidden[t].float(), 32, seq[t + 1])
                for k in range(h.n_heads):
                    top1[name][k] += t + k + 2 < len(seq) and int(ids[k, 0]) == argmax[t + k + 1]
                for n in SIZES:
                    for kind, tree in (("static", shapes[name][n].tree(seq[t + 1], ids)),
                                       ("dynamic", dynamic_tree(seq[t + 1], ids, probs, n)[0])):
                        total[f"{name}-{kind}"][n] += accepted(tree.parents.tolist(), tree.tokens.tolist(), seq,
                                                               argmax, t)
    report = {"tokens_per_step": {m: {n: round(1 + v / steps, 4) for n, v in row.items()} for m, row in total.items()},
              "top1_on_answers": {name: [round(c / max(1, s), 4) for c, s in zip(row, seen)]
                                  for name, row in top1.items()},
              "steps": steps, "config": {**vars(args), "dtype": dtype, "sizes": SIZES,
                                         "answer_tokens": sum(map(len, replies))}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceptance.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "acceptance.png")
    print(json.dumps({k: report[k] for k in ("tokens_per_step", "top1_on_answers", "steps")}, indent=2))
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, row in report["tokens_per_step"].items():
        sizes = [int(n) for n in row]
        ax.plot(sizes, list(row.values()), marker="o", linestyle="-" if "dynamic" in method else "--", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree nodes verified per step (N)")
    ax.set_ylabel("tokens per step (accepted + 1)")
    ax.set_title(f"{report['steps']} steps on the target's own answers")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
