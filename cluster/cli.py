"""`specray generate | bench | bench-long | bench-protocol | train-heads | linearize`.

Flags are a contract (see DESIGN.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

PIPELINES = ("local", "sync", "async", "ssd")
# actors.hardware.DTYPE_CHOICES, without importing torch
DTYPE_CHOICES = ("file", "auto", "float32", "bfloat16", "float16", "int8", "int4", "gguf")
DTYPE_HELP = ("target precision, which defines the target; file (default): as its files store it, so a GGUF "
              "model decodes its own quantized blocks (gguf) on CPUs with the native kernels, anything else "
              "float32; float32 asks for a GGUF model's dense conversion")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_generate_args(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--target", help="built-in alias, local directory or hub id")
    who.add_argument("--ensemble", help="comma-separated models decoding as one ensemble")
    p.add_argument("--draft", help="draft model (same tokenizer as the target), `self`: the target drafts for "
                                   "itself with sparse attention over its own cache, or `ngram`: drafts copied from "
                                   "earlier tokens (prompt lookup, no model); both --pipeline local")
    add_attention_args(p)
    p.add_argument("--heads", help="draft heads instead of a draft model: built-in name (medusa, amphista) "
                                   "or directory")
    p.add_argument("--tree", choices=("static", "dynamic"), default="dynamic",
                   help="with --heads: a fixed tree from the heads' measured accuracies, or one built per step")
    p.add_argument("--combine", help="ensemble rule: we:LAMBDA (2 models), we:W1,W2,... (one weight per model) "
                                     "or cd:MU (expert first, amateur second)")
    p.add_argument("--ensemble-method", choices=("cos", "ensemble"), default="cos",
                   help="ensembles: cos (speculative, default) or ensemble (every model at every token)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--pipeline", choices=PIPELINES, default="local")
    p.add_argument("--draft-length", type=_positive_int, default=None, help="fixed; default adaptive")
    p.add_argument("--tree-width", type=_positive_int, default=1, help="candidates per depth (1 = chain)")
    add_pipeline_args(p)
    p.add_argument("--dtype", default="file", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--draft-dtype", default="auto", choices=DTYPE_CHOICES,
                   help="draft precision; auto (default): the cheapest form the device runs fast: on CPUs the "
                        "model's GGUF quantization (or int8), else bfloat16 where native, else float32 (the draft "
                        "only proposes: its precision cannot change the output)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def add_attention_args(p: argparse.ArgumentParser) -> None:
    """Long contexts: TidalDecode sparse attention (actors/tidal.py) and the request limit."""
    p.add_argument("--draft-attention", default=None, metavar="tidal[:BUDGET]",
                   help="the draft attends sparsely to BUDGET cached positions (default 256) in most layers; the "
                        "target verifies with full attention, so the output is exactly the target's")
    p.add_argument("--attention", default=None, metavar="tidal[:BUDGET]",
                   help="the TARGET attends sparsely: faster at long context but APPROXIMATE (output close to, "
                        "not guaranteed equal to, full attention; stats say approximate)")
    p.add_argument("--max-len", type=_positive_int, default=None,
                   help="refuse requests whose prompt + max-new-tokens exceed this (default: the model's context)")


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """How the Ray pipelines (sync, async) place and run their two actors."""
    p.add_argument("--lookahead", type=_positive_int, default=8,
                   help="async: most drafts the drafter may run ahead of the committed tokens")
    p.add_argument("--accelerator", choices=("auto", "gpu", "cpu"), default="auto",
                   help="actor bundles: GPUs when the cluster has one per actor (auto), or force")
    p.add_argument("--cpus-per-actor", type=_positive_int, default=1)
    p.add_argument("--spread", action="store_true", help="place the actors on different nodes")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="required unless --ensemble")
    p.add_argument("--draft", help="the draft model of spec-* and hf-assisted (required unless --ensemble)")
    p.add_argument("--heads", default=None,
                   help="heads of the medusa-* methods (default: the target's built-in medusa)")
    p.add_argument("--amphista-heads", default=None,
                   help="heads of the amphista-* methods (default: the target's built-in amphista)")
    p.add_argument("--ensemble", help="comma-separated models: bench methods ensemble,cos on this ensemble")
    p.add_argument("--combine", help="ensemble rule (with --ensemble): we:LAMBDA, we:W1,W2,... or cd:MU")
    p.add_argument("--ensemble-local", action="store_true",
                   help="ensembles: every member in this process instead of one Ray actor each")
    p.add_argument("--temperature", type=float, default=0.0, help="ensembles only; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="ensembles only")
    p.add_argument("--seed", type=int, default=0, help="ensembles: prompt i samples with seed + i")
    p.add_argument("--draft-length", type=_positive_int, default=None, help="ensembles: fixed CoS draft length")
    p.add_argument("--dtype", default="file", choices=DTYPE_CHOICES,
                   help="target (or every ensemble member's) dtype; " + DTYPE_HELP)
    p.add_argument("--prompts", required=True, help="JSONL with a `prompt` string or a `turns` list")
    p.add_argument("--limit", type=_positive_int, default=20)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--methods", default=None,
                   help="default hf,hf-assisted,ar,spec-local (a GGUF target: ar,spec-local,spec-ngram); with "
                        "--ensemble: ensemble,cos")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--chat", action="store_true", help="apply the chat template to each prompt")
    p.add_argument("--tree-width", type=_positive_int, default=1)
    p.add_argument("--draft-dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: the cheapest form the device runs fast (see README)")
    p.add_argument("--llamacpp", default=None,
                   help="bin folder of a llama.cpp build, for methods llamacpp,llamacpp-spec ($SPECRAY_LLAMACPP_BIN)")
    add_pipeline_args(p)


def add_train_heads_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the model the heads draft for (kept frozen)")
    p.add_argument("--kind", default="medusa", choices=("medusa", "amphista"),
                   help="medusa: independent heads on h_t; amphista: staged adaptation of h_t and the newest "
                        "token, then heads that attend to each other")
    p.add_argument("--out", required=True, help="directory for heads.json + heads.safetensors")
    p.add_argument("--heads", type=_positive_int, default=4, help="K: head k guesses the token k+1 past the next")
    p.add_argument("--tokens", type=_positive_int, default=300_000, help="target-prefilled training tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--width", type=_positive_int, default=512, help="amphista: the auto-embedding block's width")
    p.add_argument("--hot-vocab", type=_positive_int, default=16384,
                   help="output rows the heads score (the target's most frequent predictions)")
    p.add_argument("--work", default=None,
                   help="cache of answers, features and checkpoints (default under ~/.cache/specray/train-heads, "
                        "shared by both kinds: their data and labels are the same); rerun the same command to resume")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl whose answers the target writes "
                                                     "(default ../shared/data/spec_bench/question.jsonl)")


def add_linearize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the dense model to linearize (kept frozen)")
    p.add_argument("--out", required=True, help="directory for linear.json + linear.safetensors")
    p.add_argument("--work", default=None, help="cache of chunks, captured q/k/v and checkpoints (default under "
                                               "~/.cache/specray/linearize); rerun the same command to resume")
    p.add_argument("--tokens", type=int, default=32768, help="training tokens (captured once, then --epochs passes)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per training chunk")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--group", type=int, default=64, help="softmax inside groups of this many positions")
    p.add_argument("--features", type=int, default=64, help="feature-map size per head (2x after the Hedgehog map)")
    p.add_argument("--conv", type=int, default=4, help="taps of the causal convolution on V")
    p.add_argument("--seed", type=int, default=0)


def add_bench_long_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True)
    p.add_argument("--draft", default=None, help="the draft model of spec-local and spec-tidal-draft")
    p.add_argument("--context", default="4096,16384", help="comma-separated context lengths in tokens")
    p.add_argument("--methods", default=None, help="default ar,spec-local,spec-tidal-draft,self-tidal,tidal")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--budget", type=_positive_int, default=None,
                   help="TidalDecode: cached positions kept per KV head in sparse layers (default 256)")
    p.add_argument("--needles", type=int, default=3, help="needle-in-a-haystack prompts per context")
    p.add_argument("--codes", type=int, default=1, help="long code-file prompts per context")
    p.add_argument("--dtype", default="file", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--draft-dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--out", default="bench-out/long")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specray", description="Lossless speculative decoding on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    add_generate_args(sub.add_parser("generate", help="generate text"))
    add_bench_args(sub.add_parser("bench", help="compare methods on a prompt set"))
    add_bench_long_args(sub.add_parser("bench-long", help="compare methods at long context (4k, 16k tokens)"))
    sub.add_parser("bench-protocol", help="benchmark the ZeroMQ wire protocol", add_help=False)
    add_train_heads_args(sub.add_parser("train-heads", help="train draft heads on a frozen target"))
    add_linearize_args(sub.add_parser("linearize", help="linearize a model's attention (attention transfer)"))
    return p


def run_generate(args: argparse.Namespace) -> int:
    from cluster.generate import generate_from_args

    result = generate_from_args(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        s = result["stats"]
        print(
            f"\n[{s['new_tokens']} tokens, {s['tokens_per_s']:.2f} tok/s, "
            f"{s['mean_accepted']:.2f} accepted/step, {s['target_forwards']} target forwards]",
            file=sys.stderr,
        )
    return 0


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "ensemble", None) is not None or getattr(args, "combine", None) is not None:
        from cluster.bench_ensemble import ensemble_bench_from_args as bench_from_args
    else:
        from cluster.bench import bench_from_args
    bench_from_args(args)
    return 0


def run_bench_long(args: argparse.Namespace) -> int:
    from cluster.bench_long import bench_long_from_args

    bench_long_from_args(args)
    return 0


def run_train_heads(args: argparse.Namespace) -> int:
    from pathlib import Path

    from actors.loading import cache_root
    from training.config import DEFAULT_QUESTIONS, TrainConfig
    from training.medusa import run

    work = Path(args.work) if args.work else cache_root() / "train-heads" / f"{Path(args.target).name}-{args.seed}"
    run(TrainConfig(args.target, Path(args.out), work, kind=args.kind, heads=args.heads, tokens=args.tokens,
                    seed=args.seed, epochs=args.epochs, hot_vocab=args.hot_vocab, width=args.width,
                    questions=Path(args.questions) if args.questions else DEFAULT_QUESTIONS))
    return 0


def run_linearize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from actors.loading import cache_root
    from training.config import LinearizeConfig
    from training.linearize import run

    work = Path(args.work) if args.work else cache_root() / "linearize" / f"{Path(args.model).name}-{args.seed}"
    run(LinearizeConfig(args.model, Path(args.out), work, tokens=args.tokens, seq=args.seq, epochs=args.epochs,
                        lr=args.lr, group=args.group, features=args.features, conv=args.conv, seed=args.seed))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench-protocol"]:
        from cluster.bench_protocol import main as bench_protocol

        return bench_protocol(argv[1:])
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        commands = {"generate": run_generate, "bench": run_bench, "bench-long": run_bench_long,
                    "train-heads": run_train_heads, "linearize": run_linearize}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"specray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
