"""Why specray's int8/int4 run on its own GGUF-block kernels and not torch's: both timed
side by side on the same shapes, rows 1..16, interleaved.

    python -m benchmarks.quant_kernels --out bench-out/quant_kernels

Candidates for the same [n, k] weight:
- int8: torch `_weight_int8pack_mm` (one scale per output channel: it cannot hold a
  group-wise Q8_0 weight exactly), against our Q8_0 kernel (a scale per 32);
- int4: torch `_weight_int4pack_mm_for_cpu` (groups of 32, scale and zero per group: it
  holds Q4_0 exactly), against our Q4_0 kernel; and our Q4_K, the built-in's own form.
Reported: GB/s of weight bytes per call and the time ratio to ours.
"""

from __future__ import annotations

import argparse
import sys
import time

SHAPES = [(8960, 1536), (1536, 8960), (1536, 1536)]  # the 1.5B's MLP up/gate, down, attention
ROWS = (1, 2, 4, 8, 16)


def torch_int8(w):
    import torch

    scales = w.abs().amax(dim=1) / 127
    q = torch.round(w / scales[:, None]).to(torch.int8)
    return (lambda x: torch._weight_int8pack_mm(x, q, scales)), q.numel() + scales.numel() * 4


def torch_int4(w):
    import torch

    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    scale = g.abs().amax(dim=2) / 8
    q = (torch.round(g / scale[..., None]) + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale, torch.zeros_like(scale)], dim=-1).transpose(0, 1).contiguous()  # [k/32, n, 2]
    return (lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz)), n * k // 2 + scale.numel() * 8


def ours(w, qtype):
    from actors.quantized import QuantWeight

    qw = QuantWeight.quantize(w, qtype) if qtype != "Q4_K" else None
    if qw is None:  # no Q4_K quantizer in gguf-py: random valid blocks of the shape
        import numpy as np
        import torch

        from actors import native
        from tests.tiny import random_blocks  # a test fixture; run from the repository root

        blocks = random_blocks(np.random.default_rng(0), native.Q4_K, *w.shape)
        qw = QuantWeight(torch.from_numpy(blocks), native.Q4_K, *w.shape)
    return qw.matmul, qw.nbytes


def main(argv: list[str] | None = None) -> int:
    import torch

    from actors import native

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="bench-out/quant_kernels")
    args = p.parse_args(argv)
    results = []
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        cands = {"torch int8pack (per channel)": torch_int8(w), "ours Q8_0": ours(w, native.Q8_0),
                 "torch int4pack g32": torch_int4(w), "ours Q4_0": ours(w, native.Q4_0), "ours Q4_K": ours(w, "Q4_K")}
        for rows in ROWS:
            x = torch.randn(rows, k)
            best = {name: float("inf") for name in cands}
            for rep in range(args.reps):  # interleaved: noise falls on all alike
                for name, (fn, _) in cands.items():
                    start = time.perf_counter()
                    fn(x)
                    best[name] = min(best[name], time.perf_counter() - start)
            for name, (_, nbytes) in cands.items():
                results.append({"shape": f"{k}x{n}", "rows": rows, "kernel": name, "us": round(best[name] * 1e6, 1),
                                "gbs": round(nbytes / best[name] / 1e9, 2)})
            print(f"{k}x{n} rows={rows}: " + ", ".join(f"{r['kernel']} {r['us']} us ({r['gbs']} GB/s)"
                                                       for r in results[-len(cands):]), file=sys.stderr, flush=True)
    report = {"config": {"threads": torch.get_num_threads(), "native": native.variant(), "reps": args.reps,
                         "command": "python -m benchmarks.quant_kernels " + " ".join(sys.argv[1:])},
              "results": results}
    from cluster.reporting import save_report

    save_report(args.out, report, render, plot)
    return 0


def render(report: dict) -> str:
    kernels = list(dict.fromkeys(r["kernel"] for r in report["results"]))
    lines = [f"# int8 / int4 kernels, {report['config']['threads']} threads (native {report['config']['native']})", "",
             "| shape | rows | " + " | ".join(f"{k} us (GB/s)" for k in kernels) + " |",
             "|---|---|" + "---|" * len(kernels)]
    rows = {}
    for r in report["results"]:
        rows.setdefault((r["shape"], r["rows"]), {})[r["kernel"]] = r
    for (shape, n), cells in rows.items():
        lines.append(f"| {shape} | {n} | "
                     + " | ".join(f"{cells[k]['us']} ({cells[k]['gbs']})" for k in kernels) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for kernel in dict.fromkeys(r["kernel"] for r in report["results"]):
            pts = [(r["rows"], r["us"]) for r in report["results"] if r["shape"] == shape and r["kernel"] == kernel]
            ax.plot(*zip(*pts), marker="o", label=kernel)
        ax.set_title(f"weight {shape} (in x out)")
        ax.set_xlabel("rows")
        ax.set_ylabel("us per call")
        ax.set_xscale("log", base=2)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
