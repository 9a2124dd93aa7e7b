"""The one speculative round against the serial loops it replaces, per method.

One process, one loaded copy of the built-in pair with Medusa and Amphista heads. For each
prompt, each method decodes it twice, interleaved, alternating which goes first:
- `serial`: `LocalEngine.generate` (the per-method loops in `cluster/local.py`);
- `batched`: a `BatchEngine` running `decoding.round.speculative_round` with that method's
  drafter, one request at a time (what Serve runs for one request; `specray bench` times
  the serial loops, as `specray generate --pipeline local` decodes).
Then the same prompts all at once (`--concurrency`) through the batched engine against
the serial loop decoding them one after another: what a server gains from batching.
Outputs must be token-identical; the report gives tokens/s and batched/serial ratios.

    python -m benchmarks.core_regression --limit 4 --max-new-tokens 96 --out benchmarks/results/core
"""

from __future__ import annotations

import argparse
import queue
import sys
import time

from actors.drafters.heads import HeadsDrafter
from actors.drafters.none import NoDrafter
from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.bench import load_prompts
from cluster.decoder import Request
from cluster.engine import EngineConfig, LocalEngine
from cluster.reporting import save_report
from decoding.request import DecodeConfig

METHODS = ("ar", "spec-local", "medusa-dynamic", "amphista-dynamic")


def serial_run(local: LocalEngine, method: str, prompt: list[int], cfg: DecodeConfig) -> list[int]:
    if method == "ar":
        return local.generate(prompt, cfg, speculative=False).token_ids
    if method == "spec-local":
        return local.generate(prompt, cfg).token_ids
    heads, tree = method.split("-")
    return local.generate(prompt, cfg, tree=tree, heads=heads).token_ids


def batched_engine(local: LocalEngine, method: str, max_seqs: int) -> BatchEngine:
    cfg = BatchConfig(max_seqs=max_seqs)
    if method == "ar":
        return BatchEngine(local, cfg, drafter=NoDrafter())
    if method == "spec-local":
        return BatchEngine(local, cfg)  # the draft model: what the engine loaded
    heads, tree = method.split("-")
    return BatchEngine(local, cfg, drafter=HeadsDrafter(local.head_drafter(tree, heads)))


def batched_run(engine: BatchEngine, prompts: list[list[int]], cfg: DecodeConfig) -> dict[str, list[int]]:
    events: queue.Queue = queue.Queue()
    reqs = [Request(p, cfg) for p in prompts]
    for r in reqs:
        engine.submit(r, events.put)
    out, done = {r.id: [] for r in reqs}, 0
    while done < len(reqs):
        ev = events.get(timeout=1800)
        if ev.error:
            raise RuntimeError(ev.error)
        out[ev.request_id] += ev.token_ids
        done += ev.done
    return [out[r.id] for r in reqs]


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    local = LocalEngine(EngineConfig(args.target, args.draft, heads="medusa", more_heads=("amphista",),
                                     max_len=args.max_len), progress=True)
    prompts = [local.encode(p, chat=True) for p in load_prompts(args.prompts, args.limit)]
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=tuple(local.eos_token_ids))
    engines = {m: batched_engine(local, m, max(args.concurrency, 1)) for m in METHODS}
    single = {m: {"serial": [0, 0.0], "batched": [0, 0.0], "identical": True} for m in METHODS}
    try:
        for i, prompt in enumerate(prompts):
            for m in METHODS:
                order = ("serial", "batched") if i % 2 == 0 else ("batched", "serial")
                got, secs = {}, {}
                for kind in order:
                    if kind == "serial":
                        got[kind], secs[kind] = timed(lambda: serial_run(local, m, prompt, cfg))
                    else:
                        (got[kind],), secs[kind] = timed(lambda: batched_run(engines[m], [prompt], cfg))
                    single[m][kind][0] += len(got[kind])
                    single[m][kind][1] += secs[kind]
                single[m]["identical"] &= got["serial"] == got["batched"]
                print(f"prompt {i + 1}/{len(prompts)} {m}: " + ", ".join(
                    f"{k} {len(got[k]) / secs[k]:.2f} tok/s" for k in order), file=sys.stderr, flush=True)
        together = {}
        for m in ("ar", "spec-local", "medusa-dynamic"):
            serial_out, serial_s = timed(lambda: [serial_run(local, m, p, cfg) for p in prompts])
            batched_out, batched_s = timed(lambda: batched_run(engines[m], prompts, cfg))
            tokens = sum(len(t) for t in serial_out)
            together[m] = {"serial_tok_s": tokens / serial_s, "batched_tok_s": sum(len(t) for t in batched_out)
                           / batched_s, "identical": serial_out == batched_out,
                           "draft_lengths": engines[m].state()["draft_lengths"]}
            together[m]["ratio"] = together[m]["batched_tok_s"] / together[m]["serial_tok_s"]
            print(f"{len(prompts)} at once, {m}: {together[m]}", file=sys.stderr, flush=True)
    finally:
        for e in engines.values():
            e.close()
    rows = {}
    for m, r in single.items():
        serial, batched = r["serial"][0] / r["serial"][1], r["batched"][0] / r["batched"][1]
        rows[m] = {"serial_tok_s": serial, "batched_tok_s": batched, "ratio": batched / serial,
                   "identical": r["identical"]}
    ar = rows["ar"]["serial_tok_s"]
    for r in rows.values():
        r["batched_vs_serial_ar"] = r["batched_tok_s"] / ar
    return {"command": " ".join(sys.argv), "target": args.target, "draft": args.draft, "prompts": args.prompts,
            "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "one_at_a_time": rows,
            "all_at_once": together, "runtime": local.runtime_info()}


def render(report: dict) -> str:
    lines = [f"# The one round vs the serial loops ({report['n_prompts']} prompts, "
             f"{report['max_new_tokens']} new tokens, greedy)", "",
             "One request at a time:", "",
             "| method | serial tok/s | batched tok/s | batched / serial | batched / serial ar | identical |",
             "|---|---|---|---|---|---|"]
    for m, r in report["one_at_a_time"].items():
        lines.append(f"| {m} | {r['serial_tok_s']:.2f} | {r['batched_tok_s']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['batched_vs_serial_ar']:.2f}x | {r['identical']} |")
    lines += ["", f"All {report['n_prompts']} at once (serial: one after another):", "",
              "| method | serial tok/s | batched tok/s | batched / serial | identical | draft lengths |",
              "|---|---|---|---|---|---|"]
    for m, r in report["all_at_once"].items():
        lines.append(f"| {m} | {r['serial_tok_s']:.2f} | {r['batched_tok_s']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['identical']} | {r['draft_lengths']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "one_at_a_time", "one request at a time"),
                           (axes[1], "all_at_once", f"{report['n_prompts']} requests at once")):
        rows = report[key]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["serial_tok_s"] for r in rows.values()], 0.4, label="serial loop")
        ax.bar([x + 0.2 for x in xs], [r["batched_tok_s"] for r in rows.values()], 0.4, label="one round, batched")
        ax.set_xticks(list(xs), list(rows), rotation=20)
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b")
    p.add_argument("--prompts", default="benchmarks/prompts/spec_bench_coding.jsonl")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=4, help="slots of each batched engine")
    p.add_argument("--out", default="benchmarks/results/core")
    args = p.parse_args(argv)
    save_report(args.out, run(args), render, plot)


if __name__ == "__main__":
    main()
