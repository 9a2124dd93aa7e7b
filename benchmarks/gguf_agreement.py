"""How often the GGUF-loaded target (native kernels) and its fp32 conversion pick the same
greedy tokens: same weights, different arithmetic (int8-rounded activations vs fp32).

    python -m benchmarks.gguf_agreement --model qwen2.5-coder-1.5b \
        --prompts benchmarks/prompts/spec_bench_coding.jsonl --limit 8 --max-new-tokens 128

Per prompt: both decode greedily; reported are whether the outputs are identical, where
they first diverge, and, teacher-forced on the fp32 output (the prompt, then that output as
one chunk: for the row-exact GGUF model bitwise its own decoding steps), the share
of positions where the GGUF model's argmax agrees with the fp32 model's, the fp32 model's
top-1/top-2 logit margin where it does not, and how often the fp32 model's own one-pass
argmax equals what it decoded token by token (divergence happens at near-ties, and the
fp32 model alone flips some of them between its one-row and many-row kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from actors import loading
    from actors.runner import ModelRunner
    from cluster.bench import load_prompts
    from cluster.engine import encode_prompt
    from cluster.local import DecodeConfig, autoregressive_generate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--prompts", default="benchmarks/prompts/spec_bench_coding.jsonl")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="bench-out/gguf_agreement")
    args = p.parse_args(argv)
    runners = {}
    for precision in ("float32", "gguf"):
        loaded = loading.load(args.model, precision, progress=False)
        runners[precision] = ModelRunner.for_serving(loaded.build(), 4096)
        tokenizer, eos = loaded.tokenizer, loaded.eos_token_ids
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
    rows = []
    for i, text in enumerate(load_prompts(args.prompts, args.limit)):
        ids = encode_prompt(tokenizer, text, chat=True)
        outs = {k: autoregressive_generate(r, ids, cfg).token_ids for k, r in runners.items()}
        ref = outs["float32"]
        diverge = next((j for j, (a, b) in enumerate(zip(ref, outs["gguf"])) if a != b), None)
        logits = {}
        for k, r in runners.items():  # the prompt as a prefill (as decoding does), then ref as one chunk
            r.reset()
            first = r.model(torch.tensor(ids), r.cache)[-1:]
            logits[k] = torch.cat([first, r.model(torch.tensor(ref[:-1]), r.cache)]) if len(ref) > 1 else first
        picks = {k: v.argmax(-1) for k, v in logits.items()}
        agree = picks["gguf"] == picks["float32"]
        # the same fp32 model scoring its own greedy output in one pass: its many-row kernels
        # round differently from the one-row kernels that decoded it, so near-ties flip too
        fp32_self = float((picks["float32"] == torch.tensor(ref)).float().mean())
        top2 = logits["float32"].topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1])[~agree].tolist()
        rows.append({"prompt": i, "identical": outs["gguf"] == ref, "first_divergence": diverge,
                     "tokens": len(ref), "teacher_forced_agreement": round(float(agree.float().mean()), 4),
                     "fp32_one_pass_vs_its_decode": round(fp32_self, 4),
                     "fp32_margin_where_they_differ": [round(m, 3) for m in margins]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = {"model": args.model, "prompts": len(rows), "identical": sum(r["identical"] for r in rows),
               "mean_teacher_forced_agreement": round(sum(r["teacher_forced_agreement"] for r in rows) / len(rows), 4),
               "command": "python -m benchmarks.gguf_agreement " + " ".join(sys.argv[1:]), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
