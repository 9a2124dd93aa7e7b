"""`specray bench`: every method on the same prompts, interleaved, in one run.

Each method is a `DecoderSpec` (`cluster/bench_methods.py`) built through `make_decoder`
and timed through `Decoder.generate`, the interface every front end uses; our methods and
the peers (`hf`, `hf-assisted`, `llamacpp*`) alike. Methods run prompt by prompt in a
rotating order, so machine noise (other jobs, thermal drift) falls on all of them alike;
results are reported as ratios to `hf`. The decoders share one `ModelPool`: the target is
loaded once for every method that decodes in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.bench_methods import METHODS, PIPELINE_METHODS, MethodTotals, method_spec
from cluster.bench_report import make_report, render_markdown, write_report
from cluster.decoder import Decoder
from cluster.engine import EngineConfig, check_models, encode_prompt
from cluster.factory import make_decoder
from cluster.generate import resolve_target_dtype
from cluster.local import DecodeConfig
from cluster.models import ModelPool

DEFAULT_METHODS = "hf,hf-assisted,ar,spec-local"
# A GGUF target: transformers would run another model (its dense conversion), so the
# baselines are our own AR and the drafters that pay on a quantized target.
DEFAULT_GGUF_METHODS = "ar,spec-local,spec-ngram"


def default_methods(args: argparse.Namespace) -> str:
    if args.dtype != "gguf":
        return DEFAULT_METHODS
    return DEFAULT_GGUF_METHODS if args.draft else DEFAULT_GGUF_METHODS.replace("spec-local,", "")
ENSEMBLE_METHODS = ("ensemble", "cos")  # with --ensemble: the baseline (every model, every token) and CoS


def load_categories(path: str | Path, limit: int | None) -> list[str | None]:
    """Each prompt's `category` (Spec-Bench's files have one), None where absent."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [row.get("category") if isinstance(row, dict) else None for row in rows][:limit or None]


def load_prompts(path: str | Path, limit: int | None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        text = row.get("prompt") if isinstance(row, dict) else None
        if text is None and isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            text = row["turns"][0]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: needs a `prompt` string or a non-empty `turns` list")
        prompts.append(text)
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def parse_methods(text: str, allowed: tuple[str, ...] = tuple(METHODS)) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        hint = ""
        if any(m in ENSEMBLE_METHODS for m in unknown):
            hint = " (ensemble and cos need --ensemble A,B --combine RULE)"
        elif allowed == ENSEMBLE_METHODS:
            hint = " (with --ensemble)"
        raise ValueError(f"unknown bench method(s) {unknown}; choose from {', '.join(allowed)}{hint}")
    return methods


def bench_from_args(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    if args.target is None:
        raise ValueError("bench needs --target (or --ensemble A,B --combine RULE)")
    if getattr(args, "temperature", 0.0) != 0:
        raise ValueError("--temperature applies to ensemble benches (--ensemble); the pair bench is greedy")
    resolve_target_dtype(args)
    methods = parse_methods(args.methods or default_methods(args))
    drafting = [m for m in methods if METHODS[m].needs_draft]
    if args.draft is None and drafting:
        raise ValueError(f"bench methods {', '.join(drafting)} need --draft")
    if "spec-async" in methods and args.tree_width != 1:
        raise ValueError("spec-async drafts a chain; --tree-width must be 1")
    specs = {m: method_spec(m, args) for m in methods}  # every bad combination, before anything loads
    heads = [s.heads for s in specs.values() if s.heads is not None]
    tokenizer = check_models(EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype,
                                          draft_dtype=args.draft_dtype, heads=heads[0] if heads else None,
                                          more_heads=tuple(heads[1:])))
    prompts = load_prompts(args.prompts, args.limit)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, tree_width=args.tree_width)
    models, decoders = ModelPool(), {}
    try:
        for m in methods:  # one decoder per method, all on the weights loaded once
            decoders[m] = make_decoder(specs[m], progress=True, models=models)
        encoded = [encode_prompt(tokenizer, p, args.chat) for p in prompts]
        # Warm up every method once (kernels, allocator, learned draft costs), untimed.
        for m in methods:
            decoders[m].generate(encoded[0][:64], cfg, METHODS[m].speculative)
        totals = {m: MethodTotals(by_text=METHODS[m].by_text) for m in methods}
        bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run", file=sys.stderr)
        for i, ids in enumerate(encoded):
            order = methods[i % len(methods):] + methods[: i % len(methods)]
            for m in order:
                bar.set_postfix_str(f"prompt {i + 1}/{len(prompts)} {m}")
                totals[m].add(decoders[m].generate(ids, cfg, METHODS[m].speculative), METHODS[m].speculative)
                bar.update()
        bar.close()
        runtime = runtime_of(decoders)
    finally:
        for decoder in decoders.values():
            decoder.close()

    report = make_report(args, methods, prompts, totals, runtime,
                         decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                         categories=load_categories(args.prompts, args.limit))
    write_report(report, out_dir)
    print(render_markdown(report))
    return report


def runtime_of(decoders: dict[str, Decoder]) -> dict:
    """What the methods ran on, resolved (dtypes, devices, kernel per shape class): the
    target and draft as the engine's methods saw them, every heads set, and the pipelines'
    verifier and drafter actors (with the nodes they ran on)."""
    runtime: dict = {}
    heads: dict = {}
    for name, decoder in decoders.items():
        info = decoder.runtime_info()
        if name in PIPELINE_METHODS:
            runtime.setdefault("pipeline_target", info.get("target"))
            runtime.setdefault("pipeline_draft", info.get("draft"))
            continue
        if "heads" in info:
            heads[METHODS[name].fields["heads"]] = info["heads"]
        for key in ("cpu", "threading", "target", "draft"):
            value = info.get(key)
            if value is not None and "backend" not in value:  # a peer's target says little of ours
                runtime.setdefault(key, value)
    if heads:
        runtime["heads"] = next(iter(heads.values()))
        if len(heads) > 1:
            runtime["heads_sets"] = heads
    return runtime
