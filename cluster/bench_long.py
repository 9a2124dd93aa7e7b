"""`specray bench-long`: decoding at long context, every method from one prefill per prompt.

On a 2-core CPU a 16k prefill takes minutes, so each prompt is prefilled once per model
(in chunks, `ModelRunner.prefill`), snapshotted, and every method decodes from a restored
copy (`ModelRunner.restore`; `start` then skips the prefill). Methods run in a rotating
order per prompt, so machine noise falls on all of them alike:

- `ar`: the target alone, full attention (the reference for `identical_to_target`);
- `spec-local`: the draft model, full attention;
- `spec-tidal-draft`: the draft attends sparsely (TidalDecode); exact output;
- `self-tidal`: no draft model, the target drafts for itself sparsely; exact output;
- `tidal`: the target itself attends sparsely: APPROXIMATE (the paper's own mode).

`step_ms` is wall time per target forward (drafting included), so the ar and tidal rows
are the cost of one decoding step at that context.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from actors import hardware, loading
from actors.tidal import TidalConfig, check_spec
from cluster.bench import parse_methods
from cluster.engine import EngineConfig, LocalEngine, check_models, check_prompt, encode_prompt
from cluster.generate import resolve_target_dtype
from cluster.local import DecodeConfig, autoregressive_generate, speculative_generate
from cluster.long_prompts import MIN_WINDOW, RESERVE, long_prompts, needle_found
from decoding.draft_length import DraftLengthPolicy

METHODS = ("ar", "spec-local", "spec-tidal-draft", "self-tidal", "tidal")
DRAFT_METHODS = ("spec-local", "spec-tidal-draft")
DEFAULT_METHODS = "ar,spec-local,spec-tidal-draft,self-tidal,tidal"


@dataclass
class Totals:
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    accepted: int = 0
    rounds: int = 0
    identical: bool = True
    needles: list[bool] = field(default_factory=list)


def peak_rss_reset() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM), so a peak belongs to one prefill."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak is then the process's so far


def peak_rss_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


class LongMethods:
    """Both models loaded once; a method is a choice of who drafts and who attends sparsely."""

    def __init__(self, engine: LocalEngine, budget: int | None):
        self.engine = engine
        n_target = engine.target.config.get_text_config().num_hidden_layers
        spec = f"tidal:{budget}" if budget else "tidal"
        self.target_tidal = TidalConfig.parse(spec, n_target)
        self.draft_tidal = None
        if engine.draft is not None:
            self.draft_tidal = TidalConfig.parse(spec, engine.draft.config.get_text_config().num_hidden_layers)
        self.policies: dict[tuple[str, int], DraftLengthPolicy] = {}

    def policy(self, method: str, context: int) -> DraftLengthPolicy:
        key = (method, context)  # verify and draft costs depend on the context: learned per context
        if key not in self.policies:
            self.policies[key] = DraftLengthPolicy()
            self.policies[key].costs.verify_s.update(self.engine.verify_costs)
        return self.policies[key]

    def run(self, method: str, ids: list[int], cfg: DecodeConfig, context: int):
        target, draft = self.engine.target_runner, self.engine.draft_runner
        target.attention = self.target_tidal if method == "tidal" else None
        if draft is not None:
            draft.attention = self.draft_tidal if method == "spec-tidal-draft" else None
        try:
            if method in ("ar", "tidal"):
                return autoregressive_generate(target, ids, cfg)
            if method == "self-tidal":
                return speculative_generate(target, target, ids, cfg, self.policy(method, context),
                                            self_draft=self.target_tidal)
            return speculative_generate(target, draft, ids, cfg, self.policy(method, context))
        finally:
            target.attention = None


def bench_long_from_args(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    methods = parse_methods(args.methods or DEFAULT_METHODS, METHODS)
    if args.draft is None and any(m in DRAFT_METHODS for m in methods):
        raise ValueError(f"bench-long methods {', '.join(m for m in methods if m in DRAFT_METHODS)} need --draft")
    contexts = parse_contexts(args.context)
    check_spec(f"tidal:{args.budget}" if args.budget else None)
    resolve_target_dtype(args)
    engine_cfg = EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype)
    tokenizer = check_models(engine_cfg)
    model_context = loading.context_length(loading.read_config(args.target))
    for c in contexts:  # every request must fit before minutes of loading and prefill
        check_prompt(c, args.max_new_tokens, model_context)
    prompts = {c: long_prompts(tokenizer, c, args.needles, args.codes) for c in contexts}
    encoded = {c: [encode_prompt(tokenizer, p.text, chat=True) for p in prompts[c]] for c in contexts}

    engine = LocalEngine(engine_cfg)
    bench = LongMethods(engine, args.budget)
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=tuple(engine.eos_token_ids))
    draft = engine.draft_runner if any(m in DRAFT_METHODS for m in methods) else None
    for method in methods:  # warm up each method once on a short prompt, untimed
        bench.run(method, encoded[contexts[0]][0][:64], DecodeConfig(max_new_tokens=4), contexts[0])
    results, prefill = {}, {}
    bar = tqdm(total=sum(len(v) for v in encoded.values()) * len(methods), desc="bench-long", unit="run",
               file=sys.stderr)
    for c in contexts:
        totals = {m: Totals() for m in methods}
        seconds, peak = 0.0, 0.0
        for i, (prompt, ids) in enumerate(zip(prompts[c], encoded[c])):
            bar.set_postfix_str(f"{c}: prefill {i + 1}/{len(encoded[c])} ({len(ids)} tokens)")
            room = cfg.cache_room(len(ids))
            peak_rss_reset()
            start = time.perf_counter()
            snaps = []
            for role, runner in (("target", engine.target_runner), ("draft", draft)):
                if runner is not None:
                    runner.reset(room)
                    runner.prefill(ids, lambda done, total, role=role: bar.set_postfix_str(
                        f"{c}: prefill {i + 1}/{len(encoded[c])}, {role} {done}/{total} tokens"))
                    snaps.append(runner.snapshot())
            seconds += time.perf_counter() - start
            peak = max(peak, peak_rss_gib() or 0.0)
            runs = {}
            for method in methods[i % len(methods):] + methods[: i % len(methods)]:
                bar.set_postfix_str(f"{c}: prompt {i + 1}/{len(encoded[c])} {method}")
                for runner, snap in zip((engine.target_runner, draft), snaps):
                    runner.restore(snap, room)
                runs[method] = bench.run(method, ids, cfg, c)
                bar.update()
            reference = runs["ar"].token_ids if "ar" in runs else None  # full attention, target alone
            for method, result in runs.items():
                t, s = totals[method], result.stats
                t.tokens += len(result.token_ids)
                t.seconds += s.wall_s
                t.forwards += s.target_forwards
                t.accepted += s.accepted_tokens
                t.rounds += s.verify_rounds
                if reference is not None:
                    t.identical &= result.token_ids == reference
                if prompt.answer is not None:
                    t.needles.append(needle_found(prompt.answer, engine.decode(result.token_ids)))
            snaps.clear()
        results[str(c)] = {m: summarize(t, m) for m, t in totals.items()}
        prefill[str(c)] = {"prompts": len(encoded[c]),
                           "mean_tokens": round(sum(map(len, encoded[c])) / len(encoded[c])),
                           "seconds_per_prompt": round(seconds / len(encoded[c]), 2), "peak_rss_gib": peak}
    bar.close()
    report = {"config": {"target": args.target, "draft": args.draft, "dtype": args.dtype,
                         "draft_dtype": args.draft_dtype, "contexts": contexts, "methods": methods,
                         "max_new_tokens": args.max_new_tokens, "needles": args.needles, "codes": args.codes,
                         "tidal_target": bench.target_tidal.describe(),
                         "tidal_draft": bench.draft_tidal.describe() if bench.draft_tidal else None,
                         "machine": platform.machine(), "cpu": hardware.probe("cpu").to_dict(),
                         "runtime": engine.runtime_info()},
              "prefill": prefill, "contexts": results}
    from cluster.reporting import save_report

    save_report(args.out, report, render_markdown, plot)
    return report


def parse_contexts(text: str) -> list[int]:
    try:
        contexts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--context takes comma-separated token counts, e.g. 4096,16384; got {text!r}") from None
    if not contexts or min(contexts) < MIN_WINDOW + RESERVE:
        raise ValueError(f"--context needs token counts >= {MIN_WINDOW + RESERVE} (a haystack and room to answer), "
                         f"got {text!r}")
    return contexts


def summarize(t: Totals, method: str) -> dict:
    return {
        "tokens_per_s": round(t.tokens / t.seconds, 4) if t.seconds else 0.0,
        "step_ms": round(1e3 * t.seconds / t.forwards, 2) if t.forwards else None,
        "mean_accepted": round((t.accepted + t.rounds) / t.rounds, 3) if t.rounds else None,
        "identical_to_target": t.identical,
        "needle_accuracy": round(sum(t.needles) / len(t.needles), 3) if t.needles else None,
        "approximate": method == "tidal",
    }


def render_markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# bench-long: {c['target']} ({c['dtype']})" + (f" + {c['draft']} ({c['draft_dtype']})"
                                                               if c["draft"] else ""),
             "", f"TidalDecode target: {c['tidal_target']}; draft: {c['tidal_draft']}; "
                 f"{c['max_new_tokens']} new tokens, greedy.", ""]
    for ctx, rows in report["contexts"].items():
        p = report["prefill"][ctx]
        lines += [f"## context {ctx} ({p['prompts']} prompts, ~{p['mean_tokens']} tokens; prefill "
                  f"{p['seconds_per_prompt']} s per prompt, both models; peak RSS {p['peak_rss_gib']} GiB)", "",
                  "| method | tok/s | step ms | vs ar step | accepted/step | identical | needles |",
                  "|---|---|---|---|---|---|---|"]
        ar = rows.get("ar", {}).get("step_ms")
        for m, r in rows.items():
            ratio = f"{r['step_ms'] / ar:.2f}x" if ar and r["step_ms"] else "-"
            label = m + (" (approximate)" if r["approximate"] else "")
            lines.append(f"| {label} | {r['tokens_per_s']:.2f} | {r['step_ms']} | {ratio} | "
                         f"{r['mean_accepted'] or '-'} | {r['identical_to_target']} | {r['needle_accuracy']} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [int(c) for c in report["contexts"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in report["config"]["methods"]:
        steps = [report["contexts"][str(c)][m]["step_ms"] for c in contexts]
        rates = [report["contexts"][str(c)][m]["tokens_per_s"] for c in contexts]
        style = "--" if m == "tidal" else "-"
        ax1.plot(contexts, steps, style, marker="o", label=m + (" (approx.)" if m == "tidal" else ""))
        ax2.plot(contexts, rates, style, marker="o", label=m)
    for ax, title in ((ax1, "ms per target forward (lower is better)"), (ax2, "tokens / s (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(f"{c['target']} ({c['dtype']}) + {c['draft']}: {c['tidal_target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
