"""What verifying a few tokens costs next to one decoding step, per fp32 linear kernel.

Speculation pays when a forward over 2-8 rows costs little more than over 1 row: the
weights are streamed once either way. This times every fp32 kernel candidate of
`actors.kernels` on the 1.5B target's shapes, rows 1..8, interleaved (round robin over
kernels and rows, repeated), and reports each row count's best time as a ratio to one row.
Run it once on the default path and once with the AVX2 path forced to compare them:

    python -m benchmarks.small_rows
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.small_rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SHAPES = {"lm_head": (151936, 1536), "mlp_up": (8960, 1536), "mlp_down": (1536, 8960), "attn": (1536, 1536)}
ROWS = (1, 2, 3, 4, 8)
# weight bytes per forward of the fp32 1.5B: 28 layers of 2 MLP-in, 1 MLP-out, ~2.3 attention-sized, plus the head
PER_FORWARD = {"lm_head": 1, "mlp_up": 2 * 28, "mlp_down": 28, "attn": 2.33 * 28}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from actors import hardware
    from actors.kernels import KERNELS, candidates

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = candidates(torch.float32, "cpu")
    best: dict[str, dict[str, dict[int, float]]] = {s: {k: {} for k in names} for s in SHAPES}
    weights = {s: torch.randn(*shape) for s, shape in SHAPES.items()}
    inputs = {(s, m): torch.randn(m, SHAPES[s][1]) for s in SHAPES for m in ROWS}
    total = args.repeats * len(SHAPES) * len(names) * len(ROWS)
    done = 0
    for _ in range(args.repeats):
        for s, w in weights.items():
            for m in ROWS:
                for k in names:
                    fn, x = KERNELS[k], inputs[(s, m)]
                    fn(x, w, None)  # warm
                    start = time.perf_counter()
                    for _ in range(3):
                        fn(x, w, None)
                    t = (time.perf_counter() - start) / 3
                    best[s][k][m] = min(best[s][k].get(m, float("inf")), t)
                    done += 1
            print(f"\r{done}/{total} timings", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    # the fastest kernel at each row count (what the tuner would pick), as a forward would run
    fastest = {s: {m: min(best[s][k][m] for k in names) for m in ROWS} for s in SHAPES}
    forward = {m: sum(PER_FORWARD[s] * fastest[s][m] for s in SHAPES) for m in ROWS}
    caps = hardware.probe("cpu")
    report = {
        "cpu": f"{hardware.cpu_model_name()} ({caps.isa})",
        "forced": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
                   if k in os.environ},
        "threads": args.threads,
        "ms": {s: {k: {m: round(1e3 * t, 3) for m, t in v.items()} for k, v in ks.items()} for s, ks in best.items()},
        "linears_of_a_forward_ms": {m: round(1e3 * t, 1) for m, t in forward.items()},
        "vs_one_row": {m: round(forward[m] / forward[1], 2) for m in ROWS},
    }
    print(f"{report['cpu']}, forced: {report['forced'] or 'nothing'}, {args.threads} threads")
    head = " | ".join(f"{s} (best kernel) ms" for s in SHAPES)
    print(f"| rows | {head} | linears of one forward ms | vs 1 row |")
    print("|---" * (len(SHAPES) + 3) + "|")
    for m in ROWS:
        cells = " | ".join(f"{1e3 * fastest[s][m]:.2f}" for s in SHAPES)
        print(f"| {m} | {cells} | {1e3 * forward[m]:.0f} | {forward[m] / forward[1]:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
