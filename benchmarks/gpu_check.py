"""The GPU check: run on a machine with CUDA (the lent device machine) whenever there is one.

    bash benchmarks/gpu_check.sh            # the CUDA tests, then this script
    python -m benchmarks.gpu_check --device cuda

Model weights cannot travel to that machine (64 MiB limit), so this builds random models
of the built-ins' real shapes (Qwen2.5-Coder 1.5B target, 0.5B draft) on the device and
checks what only a GPU can break: greedy speculation equals the target alone, sampled
speculation runs with a CPU seed generator (it used to raise: `torch.multinomial` with CUDA
probabilities and a CPU generator) and repeats for a seed, and it reports step times.
`--small` uses tiny shapes, to try the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SHAPES = {  # the built-ins' configs, weights random
    "target": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960),
    "draft": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864),
}
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128)


def random_model(shape: dict, vocab: int, dtype, device: str, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True, **shape)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> int:
    import torch

    from actors.hardware import probe, resolve_dtype
    from actors.model import Transformer
    from actors.runner import ModelRunner
    from cluster.local import autoregressive_generate, speculative_generate
    from decoding.request import DecodeConfig
    from decoding.sampling import SamplingParams

    p = argparse.ArgumentParser(description="CUDA smoke check on random weights of realistic shape")
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (try it on a CPU)")
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run on the GPU machine, or pass --device cpu --small")
    vocab = 512 if args.small else 151936
    caps = probe(args.device)
    draft_dtype = {"bfloat16": torch.bfloat16}.get(resolve_dtype("auto", args.device), torch.float32)
    target = random_model(SMALL if args.small else SHAPES["target"], vocab, torch.float32, args.device, 0)
    # A random draft agrees with a random target only by chance: identity is the check, not acceptance.
    draft = random_model(SMALL if args.small else SHAPES["draft"], vocab, draft_dtype, args.device, 1)
    t_run = ModelRunner.for_serving(Transformer.from_hf(target), 512)
    d_run = ModelRunner.for_serving(Transformer.from_hf(draft), 512)
    prompt = list(range(10, 42))
    report = {"capabilities": caps.to_dict(), "draft_dtype": str(draft_dtype), "checks": {}}

    greedy = DecodeConfig(max_new_tokens=args.tokens, eos_token_ids=(-1,))
    alone = autoregressive_generate(t_run, prompt, greedy)
    spec = speculative_generate(t_run, d_run, prompt, greedy)
    report["checks"]["greedy_identical"] = spec.token_ids == alone.token_ids
    report["ar_tokens_per_s"] = round(alone.stats.tokens_per_s, 2)

    sampled = DecodeConfig(max_new_tokens=args.tokens, sampling=SamplingParams(temperature=0.8, top_p=0.95),
                           seed=1234, draft_length=4, eos_token_ids=(-1,))
    first = speculative_generate(t_run, d_run, prompt, sampled)
    again = speculative_generate(t_run, d_run, prompt, sampled)
    report["checks"]["sampled_runs"] = len(first.token_ids) == args.tokens
    report["checks"]["sampled_repeats_for_a_seed"] = first.token_ids == again.token_ids  # fixed draft length
    tree = speculative_generate(t_run, d_run, prompt, DecodeConfig(
        max_new_tokens=args.tokens, sampling=SamplingParams(temperature=0.8), seed=5, tree_width=3,
        draft_length=3, eos_token_ids=(-1,)))
    report["checks"]["sampled_tree_runs"] = len(tree.token_ids) == args.tokens

    for name, runner in (("target", t_run), ("draft", d_run)):
        for k in (1, 4, 16):
            runner.reset()
            runner.feed(prompt)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                runner.model(torch.tensor(prompt[:k]), runner.cache)
                runner.cache.crop(len(prompt))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            report[f"{name}_forward_ms_k{k}"] = round((time.perf_counter() - start) / 5 * 1e3, 2)
    print(json.dumps(report, indent=1))
    ok = all(report["checks"].values())
    print("gpu check:", "PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
