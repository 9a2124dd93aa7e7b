"""`specray bench`: every method on the same prompts, interleaved, in one run.

Methods run prompt by prompt in a rotating order, so machine noise (other jobs, thermal
drift) falls on all of them alike; results are reported as ratios to `hf`. The
Hugging Face baselines and our engine share the very same weight tensors (our model
wraps the loaded HF modules), so no model is held twice in memory.

With `spec-sync` / `spec-async` in the run, the models live in the pipeline's two Ray
actors, and the engine's methods run inside the verifier actor on its copy of the target
(with the driver's thread count), so the driver never holds a second copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actors import hardware, loading
from cluster.bench_llamacpp import METHODS as LLAMACPP_METHODS
from cluster.bench_methods import HEAD_METHODS, RAY_METHODS, MethodRunner, MethodTotals, PipelineMethods, llamacpp_for
from cluster.bench_report import make_report, render_markdown, write_report
from cluster.engine import EngineConfig, LocalEngine, check_models, encode_prompt
from cluster.local import DecodeConfig

LOCAL_METHODS = ("hf", "hf-assisted", "ar", "spec-local", *HEAD_METHODS, *LLAMACPP_METHODS)
DRAFT_METHODS = ("hf-assisted", "spec-local", "spec-sync", "spec-async", "llamacpp-spec")  # need --draft
METHODS = LOCAL_METHODS + tuple(RAY_METHODS)
DEFAULT_METHODS = "hf,hf-assisted,ar,spec-local"
ENSEMBLE_METHODS = ("ensemble", "cos")  # with --ensemble: the baseline (every model, every token) and CoS


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


def parse_methods(text: str, allowed: tuple[str, ...] = METHODS) -> list[str]:
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
    methods = parse_methods(args.methods or DEFAULT_METHODS)
    if args.draft is None and any(m in DRAFT_METHODS for m in methods):
        raise ValueError(f"bench methods {', '.join(m for m in methods if m in DRAFT_METHODS)} need --draft")
    heads_for = {}  # kind -> heads (built-in name or directory)
    if any(m in HEAD_METHODS for m in methods):
        if any(m in RAY_METHODS for m in methods):
            raise ValueError("medusa and amphista methods run in this process; bench spec-sync/spec-async separately")
        given = {"medusa": getattr(args, "heads", None), "amphista": getattr(args, "amphista_heads", None)}
        heads_for = {kind: given[kind] or kind for kind, _ in (HEAD_METHODS[m] for m in methods if m in HEAD_METHODS)}
    heads_names = list(dict.fromkeys(heads_for.values()))
    hf_methods = [m for m in methods if m.startswith("hf")]
    if hf_methods and args.dtype in hardware.QUANTIZED:
        raise ValueError(f"{', '.join(hf_methods)} run transformers on a dense target; with --dtype {args.dtype} "
                         "compare ar, spec-local, llamacpp and llamacpp-spec (or bench a dense target)")
    linear_methods = [m for m in methods if m.startswith(("hf", "llamacpp"))]
    if linear_methods and loading.linear_dir(args.target) is not None:
        raise ValueError(f"{', '.join(linear_methods)} would run {args.target!r}'s softmax base, not the linearized "
                         "model; compare ar and spec-local (or spec-sync, spec-async)")
    prompts = load_prompts(args.prompts, args.limit)
    engine_cfg = EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype,
                              heads=heads_names[0] if heads_names else None, more_heads=tuple(heads_names[1:]))
    tokenizer = check_models(engine_cfg)
    use_ray = any(m in RAY_METHODS for m in methods)
    if "spec-async" in methods and args.tree_width != 1:
        raise ValueError("spec-async drafts a chain; --tree-width must be 1")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, tree_width=args.tree_width)
    llamacpp = llamacpp_for(args, methods) if any(m in LLAMACPP_METHODS for m in methods) else None
    runner = PipelineMethods(args, cfg) if use_ray else MethodRunner(LocalEngine(engine_cfg), cfg, llamacpp, heads_for)
    try:
        encoded = [encode_prompt(tokenizer, p, args.chat) for p in prompts]
        # Warm up every method once (kernels, allocator, learned draft costs), untimed.
        for method in methods:
            runner.run(method, encoded[0][:64])
        totals = {m: MethodTotals() for m in methods}
        bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run", file=sys.stderr)
        for i, ids in enumerate(encoded):
            order = methods[i % len(methods):] + methods[: i % len(methods)]
            for method in order:
                bar.set_postfix_str(f"prompt {i + 1}/{len(prompts)} {method}")
                run = runner.run(method, ids)
                t = totals[method]
                t.tokens += len(run.tokens)
                t.seconds += run.seconds
                t.outputs.append(run.tokens)
                if run.text is not None:
                    t.texts.append(run.text)
                t.draft_s += run.draft_s
                t.wait_s += run.wait_s
                t.rounds += run.rounds
                t.drafted += run.drafted
                t.build_s += run.build_s
                t.verify_s += run.verify_s
                if run.mean_accepted is not None:
                    t.accepted_per_step.append(run.mean_accepted)
                bar.update()
        bar.close()
        runtime = runner.runtime_info() if use_ray else runner.engine.runtime_info()
    finally:
        if use_ray:
            runner.close()

    report = make_report(args, methods, prompts, totals, runtime,
                         decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    write_report(report, out_dir)
    print(render_markdown(report))
    return report

