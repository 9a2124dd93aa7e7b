"""`specray generate`: validate everything cheap, then load, then decode."""

from __future__ import annotations

import argparse

from actors import loading
from cluster.engine import EngineConfig, LocalEngine, check_models, check_prompt, encode_prompt
from cluster.local import DecodeConfig
from decoding.sampling import SamplingParams


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    return DecodeConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
        seed=args.seed,
        draft_length=args.draft_length,
        tree_width=args.tree_width,
    )


def generate_from_args(args: argparse.Namespace) -> dict:
    if args.ensemble is not None or args.combine is not None:
        raise NotImplementedError("ensemble decoding (--ensemble/--combine) is not available yet")
    if args.pipeline != "local":
        raise NotImplementedError(f"--pipeline {args.pipeline} is not available yet; use --pipeline local")
    cfg = decode_config(args)  # bad numbers fail here, before anything loads
    engine_cfg = EngineConfig(target=args.target, draft=args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype)
    tokenizer = check_models(engine_cfg)
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    check_prompt(len(prompt_ids), cfg.max_new_tokens, loading.context_length(loading.read_config(args.target)))

    engine = LocalEngine(engine_cfg)
    result = engine.generate(prompt_ids, cfg)
    return {"text": engine.decode(result.token_ids), "token_ids": result.token_ids, "stats": result.stats.as_dict()}
