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
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from actors import hardware, loading
from actors.model_actor import ModelActor
from cluster.bench_llamacpp import METHODS as LLAMACPP_METHODS
from cluster.bench_llamacpp import LlamaCpp, find_binaries, same_text
from cluster.engine import EngineConfig, LocalEngine, check_models, encode_prompt
from cluster.local import DecodeConfig

HEAD_METHODS = {f"{kind}-{tree}": (kind, tree) for kind in ("medusa", "amphista")  # draft heads: kind, tree
                for tree in ("static", "dynamic")}
LOCAL_METHODS = ("hf", "hf-assisted", "ar", "spec-local", *HEAD_METHODS, *LLAMACPP_METHODS)
DRAFT_METHODS = ("hf-assisted", "spec-local", "spec-sync", "spec-async", "llamacpp-spec")  # need --draft
RAY_METHODS = {"spec-sync": "sync", "spec-async": "async"}
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


@dataclass
class MethodTotals:
    tokens: int = 0
    seconds: float = 0.0
    accepted_per_step: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # llama.cpp rows: what it printed
    draft_s: float = 0.0  # Ray pipelines: drafting time, and how much of it the verifier waited for
    wait_s: float = 0.0
    rounds: int = 0  # draft heads: verify rounds, nodes drafted and tree-build time over them
    drafted: int = 0
    build_s: float = 0.0
    verify_s: float = 0.0  # draft heads: target forwards over the trees


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    mean_accepted: float | None = None
    draft_s: float = 0.0
    wait_s: float = 0.0
    text: str | None = None  # llama.cpp rows: its output text (tokens then only count)
    rounds: int = 0
    drafted: int = 0
    build_s: float = 0.0
    verify_s: float = 0.0


class MethodRunner:
    """Runs one engine method on one prompt, in this process."""

    def __init__(self, engine: LocalEngine, cfg: DecodeConfig, llamacpp=None, heads_for: dict | None = None):
        self.engine, self.cfg, self.max_new = engine, cfg, cfg.max_new_tokens
        self.heads_for = heads_for or {}  # heads kind -> the name they were loaded under
        self.llamacpp = llamacpp  # a bench_llamacpp.LlamaCpp, when its methods are in the run

    def _hf(self, ids: list[int], assistant) -> Run:
        inputs = torch.tensor([ids])
        kwargs = dict(max_new_tokens=self.max_new, do_sample=False, attention_mask=torch.ones_like(inputs))
        if assistant is not None:
            kwargs["assistant_model"] = assistant
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.engine.target.hf_model.generate(inputs, **kwargs)
        return Run(out[0, len(ids):].tolist(), time.perf_counter() - start)

    def hf_assistant(self):
        """transformers needs a dense draft: ours when it is dense, else a dense copy (bf16
        where native, else fp32) of the same draft model, loaded once."""
        if self.engine.draft.hf_model is not None:
            return self.engine.draft.hf_model
        if getattr(self, "_assistant", None) is None:
            dense = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
            self._assistant = loading.load(self.engine.cfg.draft, dense, progress=True)
        return self._assistant.hf_model

    def run(self, method: str, ids: list[int]) -> Run:
        if method == "hf":
            return self._hf(ids, None)
        if method == "hf-assisted":
            return self._hf(ids, self.hf_assistant())
        if method in LLAMACPP_METHODS:
            prompt = self.engine.tokenizer.decode(ids, skip_special_tokens=False)
            run = self.llamacpp.run(method, prompt)
            return Run([0] * run.tokens, run.seconds, text=run.text)
        if method in HEAD_METHODS:
            kind, tree = HEAD_METHODS[method]
            result = self.engine.generate(ids, self.cfg, tree=tree, heads=self.heads_for[kind])
            s = result.stats
            return Run(result.token_ids, s.wall_s, s.mean_accepted, draft_s=s.draft_s, rounds=s.verify_rounds,
                       drafted=s.drafted_tokens, build_s=s.tree_build_s, verify_s=s.verify_s)
        result = self.engine.generate(ids, self.cfg, speculative=(method == "spec-local"))
        return Run(result.token_ids, result.stats.wall_s, result.stats.mean_accepted)


class BenchActor(ModelActor):
    """A verifier actor that can also run the engine's methods on its own target."""

    def run_local(self, method: str, ids: list[int], decode: dict, draft: str, draft_dtype: str,
                  threads: int) -> dict:
        # The drafter actor idles meanwhile: these methods get the cores the driver would have
        # (and kernels tuned for that many threads).
        torch.set_num_threads(threads)
        try:
            return asdict(self._local_methods(decode, draft, draft_dtype).run(method, ids))
        finally:
            torch.set_num_threads(self.threads)

    def local_runtime(self, decode: dict, draft: str, draft_dtype: str, threads: int) -> dict:
        torch.set_num_threads(threads)
        try:
            return self._local_methods(decode, draft, draft_dtype).engine.runtime_info()
        finally:
            torch.set_num_threads(self.threads)

    def _local_methods(self, decode: dict, draft: str, draft_dtype: str) -> MethodRunner:
        if getattr(self, "_methods", None) is None:
            cfg = EngineConfig(self.spec.model, draft, dtype=self.spec.dtype, draft_dtype=draft_dtype)
            self._methods = MethodRunner(LocalEngine(cfg, progress=False, target=self.loaded),
                                         DecodeConfig.from_dict(decode))
        return self._methods


class PipelineMethods:
    """Every method of a run that includes spec-sync / spec-async (see the module doc)."""

    def __init__(self, args: argparse.Namespace, cfg: DecodeConfig):
        from cluster.generate import placement_config
        from cluster.pipeline import PipelineConfig, RayPipeline

        self.args, self.cfg, self.threads = args, cfg, torch.get_num_threads()
        self.pipeline = RayPipeline(PipelineConfig(args.target, args.draft, dtype=args.dtype,
                                                   draft_dtype=args.draft_dtype, placement=placement_config(args)),
                                    verifier_cls=BenchActor)

    def run(self, method: str, ids: list[int]) -> Run:
        import ray

        from actors.verifying import PipelineOptions

        if method in RAY_METHODS:
            options = PipelineOptions(mode=RAY_METHODS[method], lookahead=self.args.lookahead)
            result = self.pipeline.generate(ids, self.cfg, options)
            s = result.stats
            return Run(result.token_ids, s.wall_s, s.mean_accepted, s.draft_s, s.wait_s)
        return Run(**ray.get(self.pipeline.verifier.run_local.remote(
            method, ids, self.cfg.to_dict(), self.args.draft, self.args.draft_dtype, self.threads)))

    def runtime_info(self) -> dict:
        """Where each method ran, with what: the local methods' engine in the verifier actor,
        and the pipeline's two actors."""
        import ray

        local = ray.get(self.pipeline.verifier.local_runtime.remote(
            self.cfg.to_dict(), self.args.draft, self.args.draft_dtype, self.threads))
        actors = self.pipeline.runtime_info()
        return {**local, "pipeline_target": actors["target"], "pipeline_draft": actors["draft"]}

    def close(self) -> None:
        self.pipeline.close()


def llamacpp_for(args: argparse.Namespace, methods: list[str]) -> LlamaCpp:
    """llama.cpp on the same GGUF files as our `--dtype gguf` (checked before anything loads)."""
    if any(m in RAY_METHODS for m in methods):
        raise ValueError("llamacpp methods run beside the local methods; bench spec-sync/spec-async separately")
    wanted = [m for m in methods if m in LLAMACPP_METHODS]
    bin_dir = find_binaries(getattr(args, "llamacpp", None), wanted)
    target, draft = loading.gguf_file(args.target), loading.gguf_file(args.draft)
    if target is None or ("llamacpp-spec" in wanted and draft is None):
        raise ValueError("llamacpp methods need GGUF files for the target and the draft (the built-ins have them)")
    return LlamaCpp(bin_dir, target, draft, args.max_new_tokens, torch.get_num_threads())


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


def same_as_reference(t: MethodTotals, ref_outputs: list[list[int]], decode) -> bool:
    if t.texts:  # llama.cpp rows: its printed text against the reference's
        return all(same_text(decode(ref), text) for ref, text in zip(ref_outputs, t.texts))
    return t.outputs == ref_outputs


def make_report(args, methods: list[str], prompts: list[str], totals: dict[str, MethodTotals],
                runtime: dict | None = None, decode=None) -> dict:
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
        if m in RAY_METHODS:
            # Drafting the verifier did not have to wait for: ~0 for sync, the point of async.
            hidden = 1 - t.wait_s / t.draft_s if t.draft_s > 0 else 0.0
            rows[m]["hidden_draft_fraction"] = round(min(1.0, max(0.0, hidden)), 4)
            rows[m]["draft_seconds"] = round(t.draft_s, 3)
            rows[m]["verifier_wait_seconds"] = round(t.wait_s, 3)
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
        "| method | tokens/s | speedup vs hf | vs ar | mean accepted | drafting hidden | tree nodes | "
        "tree build ms | heads ms/step | verify ms/step | identical to target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        acc = "-" if r["mean_accepted"] is None else f"{r['mean_accepted']:.2f}"
        sp = "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x"
        hidden = f"{r['hidden_draft_fraction']:.0%}" if "hidden_draft_fraction" in r else "-"
        vs_ar = "-" if r.get("speedup_vs_ar") is None else f"{r['speedup_vs_ar']:.2f}x"
        nodes = f"{r['mean_tree_nodes']:.1f}" if "mean_tree_nodes" in r else "-"
        build = f"{r['tree_build_ms']:.3f}" if "tree_build_ms" in r else "-"
        head_ms = f"{r['heads_ms_per_step']:.2f}" if "heads_ms_per_step" in r else "-"
        verify_ms = f"{r['verify_ms_per_step']:.2f}" if "verify_ms_per_step" in r else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {sp} | {vs_ar} | {acc} | {hidden} | {nodes} | {build} | "
                     f"{head_ms} | {verify_ms} | {r['identical_to_target']} |")
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
        lines.append(f"- {role}: {info.get('dtype')} on {info.get('device')}")
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
