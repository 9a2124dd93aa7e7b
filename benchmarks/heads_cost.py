"""What drafting with heads costs per step, part by part (no target forward).

    python -m benchmarks.heads_cost [--heads medusa,amphista] [--target NAME] [--repeats 50]

- heads forward, for each heads given: their layers plus the output projection over the
  hot vocabulary, and the same heads over the full vocabulary (what the hot vocabulary
  saves);
- tree build: the best-first dynamic tree (N nodes from the top-m of each head) against
  scoring every one of the m^K rank paths and keeping the best N (the enumeration the
  seed paper's dynamic tree did; m = 8 here, 4680 paths for 4 heads), both from the same
  probabilities.
Interleaved repeats, medians, one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from actors.head_kinds import load_heads, make_heads
from actors.heads import output_rows_from_files, resolve_heads
from decoding.head_tree import TreeShape, dynamic_tree


def enumerate_all(top_ids: torch.Tensor, top_p: torch.Tensor, n: int, root: int):
    """Every rank path of every depth scored at once (outer products of the heads' top-m),
    the best n kept: m + m^2 + ... + m^K scores per step, as the seed's dynamic tree did."""
    k, m = top_p.shape
    levels, scores = [], top_p[0]
    levels.append(scores)
    for d in range(1, k):
        scores = (scores[:, None] * top_p[d][None, :]).reshape(-1)
        levels.append(scores)
    flat = torch.cat(levels)
    best = flat.topk(min(n, flat.numel())).indices.tolist()
    starts = [0]
    for level in levels:
        starts.append(starts[-1] + level.numel())
    paths = []
    for i in best:
        d = next(j for j in range(k) if i < starts[j + 1])
        code, path = i - starts[d], []
        for _ in range(d + 1):
            code, r = divmod(code, m)
            path.append(r)
        paths.append(tuple(reversed(path)))
    paths.sort(key=len)
    return TreeShape(paths).tree(root, top_ids)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    from actors import loading

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--heads", default="medusa", help="built-in names or directories, comma-separated")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    paths = [resolve_heads(name, args.target) for name in args.heads.split(",")]
    weights = loading.ensure_converted(args.target, progress=True) if args.target in loading.BUILTINS \
        else loading.resolve(args.target)
    every_row = None
    hidden = torch.randn(load_heads(paths[0], weights).cfg.hidden_size)
    timed = []
    for path in paths:
        hot = load_heads(path, weights)
        if every_row is None:
            every_row = output_rows_from_files(weights, torch.arange(hot.cfg.vocab_size))
        full = make_heads(hot.cfg, torch.arange(hot.cfg.vocab_size), every_row)
        full.load_state_dict(hot.trained(), strict=False)
        full.embed = hot.embed
        name = hot.cfg.kind
        timed += [(f"{name}_hot_vocab_ms", lambda h=hot: h.top(hidden, 32, 0)),
                  (f"{name}_full_vocab_ms", lambda h=full: h.top(hidden, 32, 0))]
        params = sum(p.numel() for p in hot.trained().values())
        timed_params = {f"{name}_parameters_m": round(params / 1e6, 2)}
        timed.append(("", timed_params))
    top_ids, top_p = hot.top(hidden, 32, 0)
    small_ids, small_p = hot.top(hidden, 8, 0)
    timed += [("dynamic_tree_m32_ms", lambda: dynamic_tree(0, top_ids, top_p, args.nodes)[0].attention_mask()),
              ("enumerate_m8_ms", lambda: enumerate_all(small_ids, small_p, args.nodes, 0).attention_mask())]
    results, sizes = {}, {}
    for _ in range(3):  # interleaved rounds
        for name, fn in timed:
            if not name:
                sizes.update(fn)
                continue
            results.setdefault(name, []).append(median_ms(fn, args.repeats))
    summary = {name: round(min(v), 3) for name, v in results.items()} | sizes
    summary["config"] = {"nodes": args.nodes, "heads": [str(p) for p in paths], "threads": torch.get_num_threads(),
                         "enumerated_paths_m8": sum(8 ** d for d in range(1, hot.n_heads + 1))}
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
