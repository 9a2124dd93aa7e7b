"""Sync vs async Ray pipelines with a drafter of controlled acceptance and cost.

    python -m benchmarks.pipeline_sweep --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \\
        --prompts benchmarks/prompts/spec_bench_20.jsonl --limit 3 --max-new-tokens 64 \\
        --acceptance 0.5,0.7,0.8,0.9 --draft-cost 0.33,0.5,1.0 --out bench-out/sweep

The drafter actor loads `--draft` only for its tokenizer fingerprint (the handshake checks
it) and then drafts with `actors.oracle.OracleRunner`: it knows the target's greedy output
and drafts each token right with probability `acceptance` (decided per position and seed,
so sync and async see the same pattern), sleeping `cost * verify_step_s` per draft step.

Steps:
1. Reference: per prompt, the target alone, in the verifier actor (its `verify` call with
   no drafter, the pipeline's own target-only path).
2. verify_step_s: one sync run on the first prompt with acceptance 0 and draft length 1,
   so every verify scores 2 tokens (root + one draft): verify seconds / verify rounds. On
   CPUs a verify of k tokens costs more as k grows (see DESIGN.md); this is the cheapest.
3. Per (acceptance, cost) cell: an untimed warm-up of each mode (the sync drafter's draft
   length policy learns the new costs), then sync and async on every prompt, the order
   alternating per prompt; both outputs must equal the reference.

Writes DIR/sweep.json, DIR/sweep.md and DIR/sweep.png (async/sync tokens-per-second ratio
vs acceptance, a line per draft cost; the 1.25x target dashed). Greedy only.

On a GPU machine the same command runs as is; real weights cannot travel there, so the
target (and the draft, for its tokenizer) would be a directory of random weights with a
realistic shape and a real tokenizer (not built here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from actors import loading
from actors.pipeline_options import PipelineOptions
from cluster.bench import load_prompts
from cluster.engine import EngineConfig, check_models, check_prompt, encode_prompt
from decoding.request import DecodeConfig, GenerationStats
from protocol import new_session_id

TARGET_RATIO = 1.25
MODES = ("sync", "async")


def floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True, help="loaded for its tokenizer fingerprint only")
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--acceptance", type=floats, default=floats("0.5,0.7,0.8,0.9"))
    p.add_argument("--draft-cost", type=floats, default=floats("0.33,0.5,1.0"),
                   help="draft step cost as a fraction of one verify step")
    p.add_argument("--out", default="bench-out/sweep")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--lookahead", type=int, default=8)
    p.add_argument("--draft-length", type=int, default=None, help="sync: fixed; default adaptive")
    p.add_argument("--max-draft-length", type=int, default=12)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--draft-dtype", default="auto")
    p.add_argument("--accelerator", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--cpus-per-actor", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the oracle's coins (prompt i uses seed + i)")
    p.add_argument("--no-warmup", action="store_true")
    return p.parse_args(argv)


class Sweep:
    def __init__(self, args: argparse.Namespace):
        from cluster.pipeline import PipelineConfig, RayPipeline
        from cluster.placement import PlacementConfig

        self.args = args
        self.pipeline = RayPipeline(PipelineConfig(
            args.target, args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype,
            placement=PlacementConfig(n_actors=2, accelerator=args.accelerator, cpus_per_actor=args.cpus_per_actor)))

    def decode(self, max_new_tokens: int | None = None, draft_length: int | None = None) -> DecodeConfig:
        a = self.args
        return DecodeConfig(max_new_tokens=max_new_tokens or a.max_new_tokens, max_draft_length=a.max_draft_length,
                            draft_length=draft_length or a.draft_length)

    def target_alone(self, ids: list[int]) -> list[int]:
        """The verifier's own target-only path: a `verify` call with no drafter."""
        import ray

        p = self.pipeline
        endpoint = ray.get(p.verifier.listen.remote(p.drafter_info["node_ip"]))
        answer = ray.get(p.verifier.verify.remote(new_session_id(), endpoint, ids, self.decode().to_dict(),
                                                  PipelineOptions().to_dict(), []))
        return answer["token_ids"]

    def oracle(self, reference: list[int], acceptance: float, step_cost_s: float, seed: int) -> None:
        import ray

        ray.get(self.pipeline.drafter.use_oracle.remote(reference, acceptance, step_cost_s, seed))

    def run(self, mode: str, ids: list[int], cfg: DecodeConfig | None = None) -> tuple[list[int], GenerationStats]:
        result = self.pipeline.generate(ids, cfg or self.decode(),
                                        PipelineOptions(mode=mode, lookahead=self.args.lookahead))
        return result.token_ids, result.stats

    def close(self) -> None:
        self.pipeline.close()


def summarize(runs: list[GenerationStats]) -> dict:
    total = GenerationStats()
    for s in runs:
        for name in ("new_tokens", "verify_rounds", "accepted_tokens", "drafted_tokens", "wall_s", "draft_s",
                     "verify_s", "wait_s", "rollbacks"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
    return {
        "tokens_per_s": round(total.tokens_per_s, 4),
        "mean_accepted": round(total.mean_accepted, 4),
        "hidden_draft_fraction": round(total.hidden_draft_fraction, 4),
        "verify_step_s": round(total.verify_s / total.verify_rounds, 5) if total.verify_rounds else None,
        "new_tokens": total.new_tokens, "wall_s": round(total.wall_s, 3), "draft_s": round(total.draft_s, 3),
        "wait_s": round(total.wait_s, 3), "rollbacks": total.rollbacks,
        "drafter_lost": any(s.drafter_lost for s in runs),
    }


def sweep(args: argparse.Namespace) -> dict:
    import ray
    from tqdm import tqdm

    prompts = load_prompts(args.prompts, args.limit)
    tokenizer = check_models(EngineConfig(args.target, args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype))
    encoded = [encode_prompt(tokenizer, p, args.chat) for p in prompts]
    context = loading.context_length(loading.read_config(args.target))
    for ids in encoded:
        check_prompt(len(ids), args.max_new_tokens, context)
    cells = [(a, c) for a in args.acceptance for c in args.draft_cost]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    ray_was_up = ray.is_initialized()
    bar = tqdm(total=len(encoded) + 1 + len(cells) * len(encoded) * 2, desc="sweep", unit="run", file=sys.stderr)
    bench = None
    try:
        bench = Sweep(args)
        bar.set_postfix_str("target alone (references)")
        references = []
        for ids in encoded:
            references.append(bench.target_alone(ids))
            bar.update()
        # verify_step_s: every verify scores the root and one (wrong) draft.
        bar.set_postfix_str("measuring a verify step")
        bench.oracle(encoded[0] + references[0], 0.0, 0.0, args.seed)
        tokens, stats = bench.run("sync", encoded[0], bench.decode(draft_length=1))
        if tokens != references[0]:
            raise AssertionError("sync pipeline output differs from the target alone while measuring")
        verify_step_s = stats.verify_s / stats.verify_rounds
        bar.update()

        results = []
        for n, (acceptance, cost) in enumerate(cells):
            step_cost_s = cost * verify_step_s
            if not args.no_warmup:
                bar.set_postfix_str(f"a={acceptance} cost={cost} warm-up")
                bench.oracle(encoded[0] + references[0], acceptance, step_cost_s, args.seed)
                for mode in MODES:
                    bench.run(mode, encoded[0], bench.decode(max_new_tokens=min(16, args.max_new_tokens)))
            per_mode: dict[str, list[GenerationStats]] = {m: [] for m in MODES}
            runs, identical = [], True
            for i, ids in enumerate(encoded):
                bench.oracle(ids + references[i], acceptance, step_cost_s, args.seed + i)
                order = MODES if (i + n) % 2 == 0 else MODES[::-1]
                row = {"prompt": i}
                for mode in order:
                    bar.set_postfix_str(f"a={acceptance} cost={cost} prompt {i + 1}/{len(encoded)} {mode}")
                    tokens, stats = bench.run(mode, ids)
                    identical &= tokens == references[i]
                    per_mode[mode].append(stats)
                    row[mode] = {"tokens_per_s": round(stats.tokens_per_s, 4),
                                 "mean_accepted": round(stats.mean_accepted, 4),
                                 "identical": tokens == references[i]}
                    bar.update()
                runs.append(row)
            summary = {m: summarize(per_mode[m]) for m in MODES}
            sync_rate = summary["sync"]["tokens_per_s"]
            results.append({
                "acceptance": acceptance, "draft_cost": cost, "step_cost_s": round(step_cost_s, 5),
                "ratio": round(summary["async"]["tokens_per_s"] / sync_rate, 4) if sync_rate else None,
                "identical_to_target": identical, **summary, "runs": runs,
            })
            if not identical:
                tqdm.write(f"WARNING: a={acceptance} cost={cost}: output differs from the target alone",
                           file=sys.stderr)
        info = bench.pipeline.verifier_info
    finally:
        bar.close()
        if bench is not None:
            bench.close()
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()  # stops the local cluster if this process started it

    report = {
        "config": {
            "target": args.target, "draft": args.draft, "prompts": str(args.prompts), "limit": len(encoded),
            "max_new_tokens": args.max_new_tokens, "lookahead": args.lookahead, "draft_length": args.draft_length,
            "max_draft_length": args.max_draft_length, "dtype": args.dtype, "chat": bool(args.chat),
            "seed": args.seed, "greedy": True, "warmup": not args.no_warmup,
            "machine": {"platform": platform.platform(), "machine": platform.machine(),
                        "processor": platform.processor(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "verifier_device": info["device"],
                        "verifier_threads": info["threads"], "gpu_ids": info["gpu_ids"],
                        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "command": "python -m benchmarks.pipeline_sweep " + shlex.join(sys.argv[1:]),
        },
        "verify_step_s": round(verify_step_s, 5),
        "target_ratio": TARGET_RATIO,
        "cells": results,
    }
    write(report, out_dir)
    print(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    c, cells = report["config"], report["cells"]
    costs = sorted({r["draft_cost"] for r in cells})
    accs = sorted({r["acceptance"] for r in cells})
    by = {(r["acceptance"], r["draft_cost"]): r for r in cells}
    fmt = lambda r: "-" if r is None or r["ratio"] is None else f"{r['ratio']:.2f}x"  # noqa: E731
    lines = [
        f"# Sync vs async pipelines: {c['target']} (drafter: oracle, fingerprint of {c['draft']})",
        "",
        f"{c['limit']} prompts from `{c['prompts']}`, {c['max_new_tokens']} new tokens, greedy, lookahead "
        f"{c['lookahead']}, sync draft length {c['draft_length'] or 'adaptive'}; modes interleaved. "
        f"Verify step (2 tokens): {report['verify_step_s'] * 1000:.1f} ms; draft cost = fraction of it per "
        f"drafted token. Target: async >= {report['target_ratio']}x sync.",
        "",
        f"Command: `{c['command']}`",
        "",
        "## async / sync tokens per second",
        "",
        "| acceptance | " + " | ".join(f"cost {x:g}" for x in costs) + " |",
        "|---|" + "---|" * len(costs),
    ]
    for a in accs:
        lines.append(f"| {a:g} | " + " | ".join(fmt(by.get((a, x))) for x in costs) + " |")
    lines += [
        "",
        "## per mode",
        "",
        "| acceptance | cost | step ms | sync tok/s | async tok/s | ratio | sync mean acc | async mean acc "
        "| async hidden | async rollbacks | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cells:
        s, a = r["sync"], r["async"]
        lines.append(
            f"| {r['acceptance']:g} | {r['draft_cost']:g} | {r['step_cost_s'] * 1000:.2f} | {s['tokens_per_s']:.2f} "
            f"| {a['tokens_per_s']:.2f} | {fmt(r)} | {s['mean_accepted']:.2f} | {a['mean_accepted']:.2f} "
            f"| {a['hidden_draft_fraction']:.0%} | {a['rollbacks']} | {r['identical_to_target']} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "sweep.json").write_text(json.dumps(report, indent=2))
    (out_dir / "sweep.md").write_text(render_markdown(report))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cost in sorted({r["draft_cost"] for r in report["cells"]}):
        rows = sorted((r for r in report["cells"] if r["draft_cost"] == cost), key=lambda r: r["acceptance"])
        ax.plot([r["acceptance"] for r in rows], [r["ratio"] or 0 for r in rows], marker="o",
                label=f"draft step = {cost:g} x verify step")
    ax.axhline(report["target_ratio"], color="gray", linestyle="--", label=f"target {report['target_ratio']}x")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("acceptance rate (per drafted token)")
    ax.set_ylabel("async / sync tokens per second")
    ax.set_title(f"{report['config']['target']}, {report['config']['limit']} prompts, "
                 f"{report['config']['max_new_tokens']} new tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    sweep(parse_args(argv))


if __name__ == "__main__":
    main()
