"""How `specray bench` runs each method on one prompt: in this process (`MethodRunner`), or,
with `spec-sync` / `spec-async` in the run, inside the pipeline's verifier actor on its copy
of the target (`BenchActor`, `PipelineMethods`), so no model is held twice."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field

import torch

from actors import hardware, loading
from actors.model_actor import ModelActor
from cluster.bench_llamacpp import METHODS as LLAMACPP_METHODS
from cluster.bench_llamacpp import LlamaCpp, find_binaries
from cluster.engine import EngineConfig, LocalEngine
from cluster.local import DecodeConfig

HEAD_METHODS = {f"{kind}-{tree}": (kind, tree) for kind in ("medusa", "amphista")  # draft heads: kind, tree
                for tree in ("static", "dynamic")}
RAY_METHODS = {"spec-sync": "sync", "spec-async": "async"}


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
