"""`specray bench --ensemble A,B --combine RULE`: the ensemble baseline (`ensemble`, every
model at every token) and CoS (`cos`) on the same prompts, interleaved, in one run.

The ensemble is built as `specray generate` and the Serve app build it (a `DecoderSpec`
through `make_decoder`), and each run is timed around `Decoder.generate`."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from cluster.bench import ENSEMBLE_METHODS, load_prompts, parse_methods
from cluster.bench_methods import MethodTotals
from cluster.bench_report import write_report
from cluster.engine import encode_prompt
from cluster.local import DecodeConfig


def ensemble_bench_from_args(args: argparse.Namespace) -> dict:
    """`--ensemble A,B --combine RULE --methods ensemble,cos`: both methods on the same
    ensemble (Ray actors, one per member, unless --ensemble-local), interleaved per prompt.
    Prompt i samples with seed `--seed` + i for every method. Speedups are relative to
    `ensemble` (there is no `hf` for an ensemble); `identical_to_target` compares each
    method's tokens with `ensemble`'s at T = 0 and is null under sampling (the methods draw
    their coins differently; their distributions match, see tests/actors/test_cos.py)."""
    from tqdm import tqdm

    from cluster.ensemble import EnsembleConfig, check_members
    from cluster.factory import make_decoder
    from cluster.spec import DecoderSpec
    from decoding.sampling import SamplingParams

    if args.ensemble is None or args.combine is None:
        raise ValueError("an ensemble bench needs both --ensemble A,B[,C] and --combine RULE")
    if args.target is not None or args.draft is not None:
        raise ValueError("--ensemble benches take no --target/--draft: the ensemble is the target")
    methods = parse_methods(args.methods or ",".join(ENSEMBLE_METHODS), ENSEMBLE_METHODS)
    prompts = load_prompts(args.prompts, args.limit)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    models = tuple(m.strip() for m in args.ensemble.split(","))
    spec = DecoderSpec(ensemble=models, combine=args.combine, pipeline="local" if args.ensemble_local else "sync",
                       dtype=args.dtype, accelerator=args.accelerator, cpus_per_actor=args.cpus_per_actor,
                       spread=args.spread)
    ens_cfg = EnsembleConfig(models, args.combine, dtype=args.dtype)
    members = check_members(ens_cfg)  # before anything loads
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = [encode_prompt(members.tokenizer, p, args.chat) for p in prompts]

    def decode_cfg(seed: int, max_new: int) -> DecodeConfig:
        return DecodeConfig(max_new_tokens=max_new, sampling=sampling, seed=seed, draft_length=args.draft_length)

    def run(ids: list[int], cfg: DecodeConfig, method: str):
        began = time.perf_counter()
        result = decoder.generate(ids, cfg, speculative=method == "cos")  # "ensemble": every model, every token
        return result, time.perf_counter() - began

    decoder = make_decoder(spec, progress=True)
    totals = {m: MethodTotals() for m in methods}
    counts = {m: [0, 0] for m in methods}  # drafted, accepted proposals
    try:
        for method in methods:  # warm-up, untimed: kernels, allocator, CoS's measured costs
            run(encoded[0][:64], decode_cfg(args.seed, min(32, args.max_new_tokens)), method)
        bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run", file=sys.stderr)
        for i, ids in enumerate(encoded):
            order = methods[i % len(methods):] + methods[: i % len(methods)]
            for method in order:
                bar.set_postfix_str(f"prompt {i + 1}/{len(prompts)} {method}")
                result, seconds = run(ids, decode_cfg(args.seed + i, args.max_new_tokens), method)
                t, s = totals[method], result.stats
                t.tokens += len(result.token_ids)
                t.seconds += seconds
                t.outputs.append(result.token_ids)
                t.accepted_per_step.append(s.mean_accepted)
                counts[method][0] += s.drafted_tokens
                counts[method][1] += s.accepted_tokens
                bar.update()
        bar.close()
    finally:
        decoder.close()

    reference = "ensemble" if "ensemble" in totals else methods[0]
    ref = totals[reference]
    ref_rate = ref.tokens / ref.seconds if ref.seconds else None
    rows = {}
    for m in methods:
        t = totals[m]
        rate = t.tokens / t.seconds if t.seconds else 0.0
        drafted, accepted = counts[m]
        rows[m] = {
            "tokens_per_s": round(rate, 4),
            "mean_accepted": round(sum(t.accepted_per_step) / len(t.accepted_per_step), 4),
            "speedup_vs_hf": round(rate / ref_rate, 4) if ref_rate else None,
            "identical_to_target": (t.outputs == ref.outputs) if sampling.greedy else None,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "new_tokens": t.tokens,
            "seconds": round(t.seconds, 3),
        }
    title = f"ensemble {'+'.join(models)} ({args.combine}), {len(prompts)} prompts"
    report = {
        "config": {
            "title": title,
            "ensemble": list(models),
            "combine": ens_cfg.rule.describe(),
            "target": None,
            "draft": None,
            "prompts": str(args.prompts),
            "limit": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "methods": methods,
            "chat": bool(args.chat),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": args.seed,
            "greedy": sampling.greedy,
            "draft_length": args.draft_length,
            "default_proposer": models[members.default_proposer],
            "where": "in process" if args.ensemble_local else "one Ray actor per member",
            "reference": reference,
            "speedup_reference": reference,  # speedup_vs_hf is relative to this method here
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch_threads": torch.get_num_threads(),
            "command": "specray " + " ".join(sys.argv[1:]),
        },
        "methods": rows,
    }
    write_report(report, out_dir, render_ensemble_markdown)
    print(render_ensemble_markdown(report))
    return report


def render_ensemble_markdown(report: dict) -> str:
    c = report["config"]
    sampling = "greedy" if c["greedy"] else f"T = {c['temperature']:g}, top-p {c['top_p']:g}, seeds from {c['seed']}"
    lines = [
        f"# specray bench: {c['title']}",
        "",
        f"{c['limit']} prompts from `{c['prompts']}`, {c['max_new_tokens']} new tokens, {sampling}, methods "
        f"interleaved, {c['where']}; default proposer `{c['default_proposer']}`. Speedup vs `{c['reference']}`.",
        "",
        "| method | tokens/s | speedup | mean accepted | acceptance | identical to ensemble |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        sp = "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x"
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        same = "n/a (sampling)" if r["identical_to_target"] is None else str(r["identical_to_target"])
        lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {sp} | {r['mean_accepted']:.2f} | {acc} | {same} |")
    return "\n".join(lines) + "\n"
