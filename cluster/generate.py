"""`specray generate`: validate everything cheap, then load, then decode."""

from __future__ import annotations

import argparse
import sys

from actors import loading
from actors.pipeline_options import PipelineOptions
from cluster.engine import EngineConfig, check_models, check_prompt, encode_prompt
from cluster.factory import make_decoder
from cluster.local import DecodeConfig
from cluster.placement import PlacementConfig
from cluster.spec import DecoderSpec
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
    if mode in ("async", "ssd") and getattr(args, "tree_width", 1) != 1:
        raise ValueError(f"--pipeline {mode} drafts a chain; --tree-width must be 1")
    return PipelineOptions(mode=mode, lookahead=args.lookahead)


def placement_config(args: argparse.Namespace) -> PlacementConfig:
    return PlacementConfig(n_actors=2, accelerator=args.accelerator, cpus_per_actor=args.cpus_per_actor,
                           spread=args.spread)


def spec_from_args(args: argparse.Namespace) -> DecoderSpec:
    """The flags as a `DecoderSpec`: every rule about which go together is checked here
    (`cluster.spec`), before anything loads."""
    ensemble = tuple(m.strip() for m in args.ensemble.split(",")) if args.ensemble is not None else None
    return DecoderSpec(target=None if ensemble else args.target, draft=args.draft, heads=getattr(args, "heads", None),
                       tree=getattr(args, "tree", "dynamic"), ensemble=ensemble, combine=args.combine,
                       pipeline=args.pipeline, dtype=args.dtype, draft_dtype=args.draft_dtype,
                       max_len=getattr(args, "max_len", None), attention=getattr(args, "attention", None),
                       draft_attention=getattr(args, "draft_attention", None), lookahead=args.lookahead,
                       accelerator=args.accelerator, cpus_per_actor=args.cpus_per_actor, spread=args.spread)


def resolve_target_dtype(args: argparse.Namespace) -> None:
    """`--dtype file` (the default) or `auto`: a precision chosen for the user. Resolve it
    here, once, to what it means for this target (`loading.dtype_choice`), and say so in one
    line, so every method and actor then loads the same, named precision. (An ensemble's
    members each resolve their own.)"""
    if args.dtype in ("file", "auto") and args.target is not None and getattr(args, "ensemble", None) is None:
        args.dtype, line = loading.dtype_choice(args.target, args.dtype)
        print(f"specray: target {line}", file=sys.stderr)


def run(spec: DecoderSpec, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool = True) -> dict:
    """Load (with progress), decode one request through the `Decoder` interface, report."""
    with make_decoder(spec, progress=True) as decoder:
        result = decoder.generate(prompt_ids, cfg, speculative)
        runtime = decoder.runtime_info()  # resolved dtypes, devices, kernel per shape class (each actor's own)
        text = decoder.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return {"text": text, "token_ids": result.token_ids, "stats": {**result.stats.as_dict(), "runtime": runtime}}


def generate_from_args(args: argparse.Namespace) -> dict:
    resolve_target_dtype(args)
    spec = spec_from_args(args)
    cfg = decode_config(args)  # bad numbers fail here, before anything loads
    if spec.ensemble is not None:
        return _generate_ensemble(args, spec, cfg)
    if spec.pipeline in ("async", "ssd"):
        pipeline_options(args, spec.pipeline)  # these pipelines draft chains
    engine_cfg = EngineConfig(target=spec.target, draft=spec.draft, dtype=spec.dtype, draft_dtype=spec.draft_dtype,
                              heads=spec.heads, tree=spec.tree, max_len=spec.max_len, attention=spec.attention,
                              draft_attention=spec.draft_attention)
    tokenizer = check_models(engine_cfg)  # unknown models, foreign heads, vocabularies: before loading
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    check_prompt(len(prompt_ids), cfg.max_new_tokens, loading.context_length(loading.read_config(spec.target)),
                 engine_cfg.max_len)
    return run(spec, prompt_ids, cfg)


def _generate_ensemble(args: argparse.Namespace, spec: DecoderSpec, cfg: DecodeConfig) -> dict:
    """`--ensemble A,B[,C] --combine RULE`: the ensemble is the target. `--pipeline local`
    runs every member in this process; `sync` puts each in its own Ray actor."""
    from cluster.ensemble import EnsembleConfig, check_members

    if args.tree_width != 1:
        raise ValueError("--tree-width applies to draft/target pairs; ensembles draft chains")
    members = check_members(EnsembleConfig(spec.ensemble, spec.combine, dtype=spec.dtype))  # before loading
    prompt_ids = encode_prompt(members.tokenizer, args.prompt, args.chat)
    check_prompt(len(prompt_ids), cfg.max_new_tokens, members.context_length)
    speculative = getattr(args, "ensemble_method", "cos") == "cos"  # "ensemble": every model, every token
    return run(spec, prompt_ids, cfg, speculative)
