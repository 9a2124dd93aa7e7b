"""What `specray bench` reports: ratios, identity with the reference, the resolved runtime,
as JSON, Markdown and a plot."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

from actors import hardware
from cluster.bench_llamacpp import same_text
from cluster.bench_methods import HEAD_METHODS, PIPELINE_METHODS, MethodTotals


def same_as_reference(t: MethodTotals, ref_outputs: list[list[int]], decode) -> bool:
    if t.by_text:  # llama.cpp rows: its printed text against the reference's
        return all(same_text(decode(ref), decode(out)) for ref, out in zip(ref_outputs, t.outputs))
    return t.outputs == ref_outputs


def by_category(methods: list[str], totals: dict[str, MethodTotals], categories: list[str | None]) -> dict:
    """Tokens/s of each method over each category's prompts (the same prompts for every method)."""
    out: dict[str, dict[str, float]] = {}
    for cat in dict.fromkeys(c for c in categories if c is not None):
        rows = [i for i, c in enumerate(categories) if c == cat]
        out[cat] = {}
        for m in methods:
            done = [totals[m].per_prompt[i] for i in rows if i < len(totals[m].per_prompt)]
            seconds = sum(s for _, s in done)
            out[cat][m] = round(sum(t for t, _ in done) / seconds, 4) if seconds else 0.0
    return out


def make_report(args, methods: list[str], prompts: list[str], totals: dict[str, MethodTotals],
                runtime: dict | None = None, decode=None, categories: list[str | None] | None = None) -> dict:
    reference = "hf" if "hf" in totals else "ar" if "ar" in totals else methods[0]
    ref_outputs = totals[reference].outputs
    hf_rate = totals["hf"].tokens / totals["hf"].seconds if "hf" in totals else None
    ar_rate = totals["ar"].tokens / totals["ar"].seconds if "ar" in totals else None
    rows = {}
    for m in methods:
        t = totals[m]
        rate = t.tokens / t.seconds if t.seconds else 0.0
        rows[m] = {
            "tokens_per_s": round(rate, 4),
            "mean_accepted": round(sum(t.accepted_per_step) / len(t.accepted_per_step), 4)
            if t.accepted_per_step
            else None,
            "speedup_vs_hf": round(rate / hf_rate, 4) if hf_rate else None,
            "speedup_vs_ar": round(rate / ar_rate, 4) if ar_rate else None,
            "identical_to_target": same_as_reference(t, ref_outputs, decode),
            "new_tokens": t.tokens,
            "seconds": round(t.seconds, 3),
        }
        if m in PIPELINE_METHODS:
            # The target waiting for its drafter's answers (the round trip to the actor
            # included): what async's drafting ahead cuts.
            rows[m]["verifier_wait_seconds"] = round(t.draft_s, 3)
            rows[m]["verifier_wait_share"] = round(t.draft_s / t.seconds, 4) if t.seconds else 0.0
            if t.wait_s:  # the per-request pipeline's own clock (the batched one's is draft_s above)
                rows[m]["verifier_idle_seconds"] = round(t.wait_s, 3)
            if t.hits + t.misses:
                rows[m]["predraft_hit_rate"] = round(t.hits / (t.hits + t.misses), 4)
        if m in HEAD_METHODS and t.rounds:
            rows[m]["mean_tree_nodes"] = round(t.drafted / t.rounds, 2)  # drafted nodes verified per step
            rows[m]["tree_build_ms"] = round(1e3 * t.build_s / t.rounds, 4)
            # what drafting costs per step beside what verifying the tree costs
            rows[m]["heads_ms_per_step"] = round(1e3 * (t.draft_s - t.build_s) / t.rounds, 3)
            rows[m]["verify_ms_per_step"] = round(1e3 * t.verify_s / t.rounds, 3)
    return {
        "config": {
            "target": args.target,
            "draft": args.draft,
            "heads": (runtime or {}).get("heads"),
            "prompts": str(args.prompts),
            "limit": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "methods": methods,
            "chat": bool(args.chat),
            "dtype": args.dtype,
            "draft_dtype": args.draft_dtype,
            # what those resolved to, where: dtypes, devices, kernel per shape class, threading
            "runtime": runtime or {},
            "tree_width": args.tree_width,
            "lookahead": getattr(args, "lookahead", None),
            "greedy": True,
            "reference": reference,
            "machine": f"{platform.machine()} {hardware.cpu_model_name()}".strip(),
            "torch_threads": torch.get_num_threads(),
            "command": "specray " + " ".join(sys.argv[1:]),
        },
        "methods": rows,
        "by_category": by_category(methods, totals, categories or []),
    }


def render_markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        f"# specray bench: {c['target']}" + (f" with {c['draft']}" if c.get("draft") else "") + "".join(
            f" with {' and '.join(h['kind'] for h in heads)} heads" for heads in [_heads_described(c)] if heads),
        "",
        f"{c['limit']} prompts from `{c['prompts']}`, {c['max_new_tokens']} new tokens, greedy, "
        f"methods interleaved; reference output: `{c['reference']}`.",
        "",
        "| method | tokens/s | speedup vs hf | vs ar | mean accepted | waiting for drafts | tree nodes | "
        "tree build ms | heads ms/step | verify ms/step | identical to target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        acc = "-" if r["mean_accepted"] is None else f"{r['mean_accepted']:.2f}"
        sp = "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x"
        waiting = f"{r['verifier_wait_share']:.0%}" if "verifier_wait_share" in r else "-"
        vs_ar = "-" if r.get("speedup_vs_ar") is None else f"{r['speedup_vs_ar']:.2f}x"
        nodes = f"{r['mean_tree_nodes']:.1f}" if "mean_tree_nodes" in r else "-"
        build = f"{r['tree_build_ms']:.3f}" if "tree_build_ms" in r else "-"
        head_ms = f"{r['heads_ms_per_step']:.2f}" if "heads_ms_per_step" in r else "-"
        verify_ms = f"{r['verify_ms_per_step']:.2f}" if "verify_ms_per_step" in r else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {sp} | {vs_ar} | {acc} | {waiting} | {nodes} | {build} | "
                     f"{head_ms} | {verify_ms} | {r['identical_to_target']} |")
    cats = report.get("by_category") or {}
    if cats:
        names = list(report["methods"])
        lines += ["", "Tokens/s by prompt category (the fastest in bold):", "",
                  "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for cat, rates in cats.items():
            best = max(rates.values())
            lines.append(f"| {cat} | " + " | ".join(f"**{rates[n]:.2f}**" if rates[n] == best else f"{rates[n]:.2f}"
                                                   for n in names) + " |")
    return "\n".join(lines + render_runtime(c.get("runtime") or {})) + "\n"


def _heads_described(config: dict) -> list[dict]:
    runtime = config.get("runtime") or {}
    if runtime.get("heads_sets"):
        return list(runtime["heads_sets"].values())
    return [config["heads"]] if config.get("heads") else []


def render_runtime(runtime: dict) -> list[str]:
    """Resolved dtypes and the kernel chosen per shape class, for each model that ran."""
    if not runtime:
        return []
    cpu = runtime.get("cpu") or {}
    lines = ["", f"CPU: {cpu.get('name', '?')} ({cpu.get('isa', '?')}, native bf16: {cpu.get('native_bf16', '?')}); "
             f"threads: {(runtime.get('threading') or {}).get('threads', '?')}", ""]
    for role in ("target", "draft", "pipeline_target", "pipeline_draft"):
        info = runtime.get(role)
        if not info:
            continue
        node = f" on node {info['node_ip']}" if info.get("node_ip") else ""  # an actor's: where Ray placed it
        lines.append(f"- {role}: {info.get('dtype')} on {info.get('device')}{node}")
        lines += [f"  - `{shape}`: {kernels}" for shape, kernels in (info.get("kernels") or {}).items()]
    return lines


def write_report(report: dict, out_dir: Path, render: Callable[[dict], str] = render_markdown) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render(report))
    names = list(report["methods"])
    rates = [report["methods"][n]["tokens_per_s"] for n in names]
    accepted = [report["methods"][n]["mean_accepted"] or 0 for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(names, rates, color="tab:blue")
    ax1.set_title("tokens / s (higher is better)")
    for x, v in enumerate(rates):
        ax1.text(x, v, f"{v:.2f}", ha="center", va="bottom")
    ax2.bar(names, accepted, color="tab:green")
    ax2.set_title("mean accepted tokens per target forward")
    for x, v in enumerate(accepted):
        ax2.text(x, v, f"{v:.2f}" if v else "n/a", ha="center", va="bottom")
    c = report["config"]
    drafter = c.get("draft") or ("heads" if c.get("heads") else "no draft")
    fig.suptitle(c.get("title") or f"{c['target']} + {drafter}, {c['limit']} prompts")
    fig.tight_layout()
    fig.savefig(out_dir / "report.png", dpi=100)
    plt.close(fig)
    cats = report.get("by_category") or {}
    if cats:  # tokens/s per method per category: which method wins where
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) * len(names) / 3), 4))
        width = 0.8 / len(names)
        for j, n in enumerate(names):
            ax.bar([i + j * width for i in range(len(cats))], [cats[c][n] for c in cats], width, label=n)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], list(cats), rotation=20)
        ax.set_ylabel("tokens / s")
        ax.legend(fontsize=8)
        ax.set_title(f"{c['target']}: tokens/s by prompt category")
        fig.tight_layout()
        fig.savefig(out_dir / "by_category.png", dpi=100)
        plt.close(fig)
