"""`specray generate`: validate everything cheap, then load, then decode."""

from __future__ import annotations

import argparse

from actors import loading
from actors.verifying import PipelineOptions
from cluster.engine import EngineConfig, check_models, check_prompt, encode_prompt
from cluster.factory import DecoderSpec, make_decoder
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


def ensemble_from_args(args: argparse.Namespace) -> dict:
    """`--ensemble A,B[,C] --combine RULE`: the ensemble is the target; no --target, no --draft.
    `--pipeline local` runs every member in this process; `sync` puts each in its own Ray
    actor (CoS rounds are synchronous, so `async` is refused)."""
    from cluster.ensemble import EnsembleConfig, check_members

    if args.ensemble is None:
        raise ValueError("--combine applies to ensembles; give the members with --ensemble A,B[,C]")
    if args.combine is None:
        raise ValueError("--ensemble needs --combine: we:LAMBDA, we:W1,W2,... (one weight per model) or cd:MU")
    if args.draft is not None:
        raise ValueError("--draft does not apply to --ensemble: the members draft for each other (CoS); "
                         "for a draft/target pair use --target T --draft D")
    if args.tree_width != 1:
        raise ValueError("--tree-width applies to draft/target pairs; ensembles draft chains")
    if getattr(args, "attention", None) or getattr(args, "draft_attention", None):
        raise ValueError("--attention and --draft-attention apply to a target and its draft, not to --ensemble")
    if args.pipeline == "async":
        raise ValueError("ensembles run --pipeline local (one process) or sync (one Ray actor per member); "
                         "CoS rounds are synchronous, there is no async variant")
    cfg = decode_config(args)
    models = tuple(m.strip() for m in args.ensemble.split(","))
    placement = None
    if args.pipeline == "sync":
        placement = PlacementConfig(n_actors=len(models), accelerator=args.accelerator,
                                    cpus_per_actor=args.cpus_per_actor, spread=args.spread)
    ens_cfg = EnsembleConfig(models, args.combine, dtype=args.dtype, placement=placement)  # validates the rule
    members = check_members(ens_cfg)  # unknown models, vocabulary mismatch: before loading
    prompt_ids = encode_prompt(members.tokenizer, args.prompt, args.chat)
    check_prompt(len(prompt_ids), cfg.max_new_tokens, members.context_length)
    speculative = getattr(args, "ensemble_method", "cos") == "cos"  # "ensemble": every model, every token
    spec = DecoderSpec(ensemble=models, combine=args.combine, pipeline=args.pipeline, dtype=args.dtype,
                       accelerator=args.accelerator, cpus_per_actor=args.cpus_per_actor, spread=args.spread)
    return run(spec, prompt_ids, cfg, speculative)


def run(spec: DecoderSpec, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool = True) -> dict:
    """Load (with progress), decode one request through the `Decoder` interface, report."""
    with make_decoder(spec, progress=True) as decoder:
        result = decoder.generate(prompt_ids, cfg, speculative)
        runtime = decoder.runtime_info()  # resolved dtypes, devices, kernel per shape class (each actor's own)
        text = decoder.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return {"text": text, "token_ids": result.token_ids, "stats": {**result.stats.as_dict(), "runtime": runtime}}


def generate_from_args(args: argparse.Namespace) -> dict:
    if args.ensemble is not None or args.combine is not None:
        return ensemble_from_args(args)
    cfg = decode_config(args)  # bad numbers fail here, before anything loads
    heads = getattr(args, "heads", None)
    if heads is not None:
        if args.draft is not None:
            raise ValueError("--heads and --draft are two ways to draft; give one")
        if args.pipeline == "async":
            raise ValueError("--heads runs with --pipeline local (heads in the target's process) or sync (heads in "
                             "their own actor): each tree needs the hidden state of the previous verify")
    ray_pipeline = args.pipeline in ("sync", "async")
    attention, draft_attention = getattr(args, "attention", None), getattr(args, "draft_attention", None)
    engine_cfg = EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype,
                              heads=heads, tree=getattr(args, "tree", "dynamic"),
                              max_len=getattr(args, "max_len", None),
                              attention=attention, draft_attention=draft_attention)
    if ray_pipeline:
        if args.draft is None and heads is None:
            raise ValueError(f"--pipeline {args.pipeline} needs --draft (the drafter actor's model)")
        pipeline_options(args, args.pipeline)  # refuses what the Ray pipelines cannot run, before loading
    tokenizer = check_models(engine_cfg)
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    check_prompt(len(prompt_ids), cfg.max_new_tokens, loading.context_length(loading.read_config(args.target)),
                 engine_cfg.max_len)

    spec = DecoderSpec(target=args.target, draft=args.draft, heads=heads, tree=engine_cfg.tree, pipeline=args.pipeline,
                       dtype=args.dtype, draft_dtype=args.draft_dtype, max_len=engine_cfg.max_len, attention=attention,
                       draft_attention=draft_attention, lookahead=args.lookahead, accelerator=args.accelerator,
                       cpus_per_actor=args.cpus_per_actor, spread=args.spread)
    return run(spec, prompt_ids, cfg)
