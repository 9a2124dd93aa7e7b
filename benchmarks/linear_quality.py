"""How close a linearized model (`specray linearize`) stays to its base: perplexity on
held-out text and greedy agreement on Spec-Bench coding prompts.

    python -m benchmarks.linear_quality --model qwen2.5-coder-1.5b-linear --contexts 1024,4096 \
        --docs 3,2 --prompts 8 --max-new-tokens 64 --out benchmarks/results/linear

The base loads once. Perplexity: documents of each context length cut from the held-out
standard-library files and reference-docs topics that the linearized model's linear.json
lists (never trained on), scored by chunked forwards (every position's next-token NLL),
first with the base, then with the same Transformer linearized in place. Greedy agreement:
the base decodes every prompt, then the linearized model does; reported are the share of
positions where the two free-running outputs match, the mean matching prefix, and the
share where the linearized model's argmax, fed the base's output, picks the base's token
(teacher-forced).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
CHUNK = 512


def documents(tokenizer, heldout: dict, contexts: list[int], docs: list[int]) -> dict[str, dict[int, list[list[int]]]]:
    """{kind: {context: [token ids]}}: consecutive windows of the held-out texts, concatenated."""
    from training.linear_text import heldout_texts

    out: dict[str, dict[int, list[list[int]]]] = {}
    for kind, texts in heldout_texts(heldout).items():
        need = max(c * k for c, k in zip(contexts, docs))
        ids: list[int] = []
        for _, text in texts:
            if len(ids) >= need:
                break
            if text.strip():
                ids += tokenizer(text.rstrip() + "\n\n")["input_ids"]
        out[kind] = {c: [ids[i * c:(i + 1) * c] for i in range(k) if (i + 1) * c <= len(ids)]
                     for c, k in zip(contexts, docs)}
    return out


@torch.inference_mode()
def nll(model, ids: list[int], bar) -> torch.Tensor:
    """Next-token NLL at every position but the last, by chunked forwards (float32 [N - 1])."""
    cache = model.new_cache(len(ids))
    out = []
    for i in range(0, len(ids), CHUNK):
        chunk = torch.tensor(ids[i:i + CHUNK])
        logits = model.logits(model.forward_hidden(chunk, cache, prefill=True))
        targets = torch.tensor(ids[i + 1:i + 1 + CHUNK])
        out.append(F.cross_entropy(logits[:len(targets)], targets, reduction="none"))
        bar.update(len(chunk))
    return torch.cat(out)


def perplexities(model, docs: dict, label: str) -> dict:
    total = sum(len(d) for per in docs.values() for ds in per.values() for d in ds)
    bar = tqdm(total=total, desc=f"perplexity ({label})", unit="tok", unit_scale=True)
    res: dict = {}
    for kind, per in docs.items():
        for ctx, ds in per.items():
            if not ds:
                continue
            losses = torch.stack([nll(model, d, bar) for d in ds])  # [docs, ctx - 1]
            half = losses[:, ctx // 2:]
            res.setdefault(kind, {})[str(ctx)] = {"docs": len(ds), "ppl": round(math.exp(losses.mean().item()), 4),
                                                  "ppl_second_half": round(math.exp(half.mean().item()), 4)}
    bar.close()
    return res


def coding_prompts(tokenizer, path: Path, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for r in rows:
        if r.get("category") != "coding" or not r.get("turns"):
            continue
        ids = tokenizer.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True,
                                            tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    cache = model.new_cache(len(prompt) + n)
    logits = model.logits(model.forward_hidden(torch.tensor(prompt), cache, prefill=True)[-1:])
    out: list[int] = []
    while True:
        t = int(logits[-1].argmax())
        out.append(t)
        if t in eos or len(out) == n:
            return out
        logits = model(torch.tensor([t]), cache, last_only=True)


@torch.inference_mode()
def forced_argmax(model, prompt: list[int], ref: list[int]) -> list[int]:
    """The model's argmax at each of ref's positions, fed the prompt and ref."""
    ids = prompt + ref[:-1]
    cache = model.new_cache(len(ids))
    h = model.forward_hidden(torch.tensor(ids), cache, prefill=True)
    return model.logits(h[len(prompt) - 1:]).argmax(-1).tolist()


def decode_all(model, prompts: list[list[int]], n: int, eos: set[int], label: str) -> list[list[int]]:
    return [greedy(model, p, n, eos) for p in tqdm(prompts, desc=f"greedy ({label})", unit="prompt")]


def render(report: dict) -> str:
    c = report["config"]
    lines = [f"# Linearized attention quality: {c['model']} vs {c['base']}", "",
             f"Perplexity on held-out text (never trained on), {c['dtype']}, chunked forwards of {CHUNK} tokens; "
             "second half = positions past ctx/2 only.", "",
             "| text | context | docs | base ppl | linear ppl | ratio | base ppl (2nd half) | linear ppl (2nd half) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, per in report["perplexity"]["base"].items():
        for ctx, b in per.items():
            lin = report["perplexity"]["linear"][kind][ctx]
            lines.append(f"| {kind} | {ctx} | {b['docs']} | {b['ppl']:.3f} | {lin['ppl']:.3f} | "
                         f"{lin['ppl'] / b['ppl']:.3f} | {b['ppl_second_half']:.3f} | {lin['ppl_second_half']:.3f} |")
    for kind, per in report["perplexity"]["base"].items():
        for ctx, want in zip(c["contexts"], c["docs"]):
            got = per.get(str(ctx), {}).get("docs", 0)
            if got < want:
                lines.append(f"\nHeld-out {kind} text gives only {got} of the {want} documents of {ctx} tokens "
                             "asked for.")
    g = report["greedy"]
    lines += ["", f"Greedy agreement on {g['prompts']} Spec-Bench coding prompts (chat template, first turn), "
              f"up to {c['max_new_tokens']} new tokens:", "",
              f"- free-running positions matching: {g['position_match']:.3f}",
              f"- mean matching prefix: {g['mean_prefix']:.1f} tokens (of {g['mean_base_tokens']:.1f})",
              f"- teacher-forced argmax agreement: {g['teacher_forced']:.3f}",
              f"- identical outputs: {g['identical']} / {g['prompts']}", "",
              f"Wall time: {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from actors import hardware, loading

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b-linear", help="a linearized model (name or directory)")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--docs", default="3,2", help="documents per context (one number, or one per context)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS))
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU runs it natively, else float32")
    p.add_argument("--out", default="benchmarks/results/linear")
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    docs = [int(d) for d in str(args.docs).split(",")]
    docs = docs * len(contexts) if len(docs) == 1 else docs
    if len(docs) != len(contexts):
        p.error("--docs: one number, or one per context")
    lin_dir = loading.linear_dir(args.model)
    if lin_dir is None:
        p.error(f"--model {args.model!r} is not a linearized model")
    meta = json.loads((lin_dir / "linear.json").read_text())
    if "heldout_docs" not in meta:
        p.error(f"{lin_dir / 'linear.json'} lists no held-out documents (not made by specray linearize?)")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
    start = time.perf_counter()
    base = loading.linear_base(args.model)
    loaded = loading.load(base, dtype)
    model = loaded.build()  # the base, once: linearized in place below
    tok, eos = loaded.tokenizer, set(loaded.eos_token_ids)
    texts = documents(tok, meta["heldout_docs"], contexts, docs)
    prompts = coding_prompts(tok, Path(args.questions), args.prompts)
    ppl = {"base": perplexities(model, texts, "base")}
    base_out = decode_all(model, prompts, args.max_new_tokens, eos, "base")
    loading.load_linear(model, lin_dir)
    ppl["linear"] = perplexities(model, texts, "linear")
    lin_out = decode_all(model, prompts, args.max_new_tokens, eos, "linear")
    forced = [forced_argmax(model, pr, ref) for pr, ref in tqdm(list(zip(prompts, base_out)), desc="teacher-forced")]
    match = sum(sum(a == b for a, b in zip(r, o)) for r, o in zip(base_out, lin_out))
    prefix = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
              for r, o in zip(base_out, lin_out)]
    n_base = sum(len(r) for r in base_out)
    greedy_res = {"prompts": len(prompts), "position_match": round(match / max(n_base, 1), 4),
                  "mean_prefix": round(sum(prefix) / max(len(prefix), 1), 2),
                  "mean_base_tokens": round(n_base / max(len(prompts), 1), 2),
                  "teacher_forced": round(sum(sum(a == b for a, b in zip(f, r)) for f, r in zip(forced, base_out))
                                          / max(n_base, 1), 4),
                  "identical": sum(r == o for r, o in zip(base_out, lin_out)), "prefix_lengths": prefix}
    report = {"config": {"model": args.model, "base": base, "dtype": dtype, "contexts": contexts, "docs": docs,
                         "max_new_tokens": args.max_new_tokens, "linear": {k: meta[k] for k in (
                             "group", "features", "conv", "tokens", "epochs") if k in meta}},
              "perplexity": ppl, "greedy": greedy_res, "wall_s": round(time.perf_counter() - start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    (out / "quality.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
