"""`specray generate`: validate everything cheap, then load, then decode."""

from __future__ import annotations

import argparse

from actors import loading
from actors.verifying import PipelineOptions
from cluster.engine import EngineConfig, LocalEngine, check_models, check_prompt, encode_prompt
from cluster.local import DecodeConfig
from cluster.placement import PlacementConfig
from decoding.sampling import SamplingParams


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    return DecodeConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
        seed=args.seed,
        draft_length=args.draft_length,
        tree_width=args.tree_width,
    )


def pipeline_options(args: argparse.Namespace, mode: str) -> PipelineOptions:
    if mode == "async" and getattr(args, "tree_width", 1) != 1:
        raise ValueError("--pipeline async drafts a chain; --tree-width must be 1")
    return PipelineOptions(mode=mode, lookahead=args.lookahead)


def placement_config(args: argparse.Namespace) -> PlacementConfig:
    return PlacementConfig(n_actors=2, accelerator=args.accelerator, cpus_per_actor=args.cpus_per_actor,
                           spread=args.spread)


def generate_from_args(args: argparse.Namespace) -> dict:
    if args.ensemble is not None or args.combine is not None:
        raise NotImplementedError("ensemble decoding (--ensemble/--combine) is not available yet")
    cfg = decode_config(args)  # bad numbers fail here, before anything loads
    ray_pipeline = args.pipeline in ("sync", "async")
    if ray_pipeline:
        if args.draft is None:
            raise ValueError(f"--pipeline {args.pipeline} needs --draft (the drafter actor's model)")
        options, placement = pipeline_options(args, args.pipeline), placement_config(args)
    engine_cfg = EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype)
    tokenizer = check_models(engine_cfg)
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    check_prompt(len(prompt_ids), cfg.max_new_tokens, loading.context_length(loading.read_config(args.target)))

    if not ray_pipeline:
        engine = LocalEngine(engine_cfg)
        result = engine.generate(prompt_ids, cfg)
        text = engine.decode(result.token_ids)
    else:
        from cluster.pipeline import PipelineConfig, RayPipeline

        with RayPipeline(PipelineConfig(args.target, args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype,
                                        placement=placement)) as pipeline:
            result = pipeline.generate(prompt_ids, cfg, options)
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return {"text": text, "token_ids": result.token_ids, "stats": result.stats.as_dict()}
