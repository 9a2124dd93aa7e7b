"""What a forward of T tokens costs, per target precision: the verify-cost curve that
draft length and tree size must follow, and the bytes each token reads.

    python -m benchmarks.quant_costs --model qwen2.5-coder-1.5b --out bench-out/quant_costs

For each precision (float32, bfloat16 where native, int8, int4, gguf) the model loads
alone, then one forward of T = 1, 2, 4, 8, 16 new tokens after a 256-token context is
timed (best of 3, precisions in turn). Reported: t(T) / t(1), the weight bytes a token
reads (every linear once; the embedding lookup reads a row), the bandwidth that implies
at T = 1, and the machine's own streaming read bandwidth (a 1 GiB fp32 sum), so the
numbers say how close to the memory limit each form runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cluster.reporting import save_report

SIZES = (1, 2, 4, 8, 16)


def read_bandwidth_gbs() -> float:
    import torch

    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    data.sum()
    best = min(_timed(data.sum) for _ in range(5))
    return data.numel() * 4 / best / 1e9


def machine() -> dict:
    """What a kernel figure depends on: the CPU, the native kernel variant, threads, and the
    machine's own streaming read bandwidth."""
    import torch

    from actors import hardware, native

    return {"cpu": hardware.probe("cpu").to_dict(), "native_kernels": native.variant(),
            "threads": torch.get_num_threads(), "read_bandwidth_gbs": round(read_bandwidth_gbs(), 2)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model) -> int:
    """Bytes one token's forward reads from weights: every linear (dense or blocks)."""
    from actors.layers import Linear
    from actors.quantized import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes
        elif isinstance(m, Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def measure(model_name: str, precision: str, context: int, reps: int) -> dict:
    from actors import loading
    from actors.runner import ModelRunner

    loaded = loading.load(model_name, precision, progress=False)
    runner = ModelRunner.for_serving(loaded.build(), context + max(SIZES) + 8)
    costs = runner.measure_verify_costs(SIZES, context)
    for _ in range(reps - 1):  # best of `reps`
        again = runner.measure_verify_costs(SIZES, context)
        costs = {k: min(costs[k], again[k]) for k in SIZES}
    nbytes = weight_bytes(runner.model)
    info = runner.runtime_info()
    del runner, loaded
    return {"stored_as": info["dtype"], "forward_ms": {k: round(v * 1e3, 2) for k, v in costs.items()},
            "relative_to_1": {k: round(v / costs[1], 3) for k, v in costs.items()},
            "weight_bytes_per_token": nbytes, "effective_gbs_at_1": round(nbytes / costs[1] / 1e9, 2)}


def main(argv: list[str] | None = None) -> int:

    from actors import hardware

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--precisions", default=None, help="default: float32, bfloat16 (if native), int8, int4, gguf")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench-out/quant_costs")
    args = p.parse_args(argv)
    caps = hardware.probe("cpu")
    default = ["float32"] + (["bfloat16"] if caps.native_bf16 else []) + ["int8", "int4", "gguf"]
    precisions = args.precisions.split(",") if args.precisions else default
    for name in precisions:
        hardware.check_dtype_name(name, "precision")
    rows = {}
    for name in precisions:
        print(f"measuring {args.model} as {name} ...", file=sys.stderr, flush=True)
        rows[name] = measure(args.model, name, args.context, args.reps)
    report = {"config": {"model": args.model, "context": args.context, "sizes": list(SIZES), **machine(),
                         "command": "python -m benchmarks.quant_costs " + " ".join(sys.argv[1:])},
              "precisions": rows}
    save_report(args.out, report, render, plot)
    return 0


def render(report: dict) -> str:
    c = report["config"]
    lines = [f"# forward cost per precision: {c['model']}, {c['context']}-token context, {c['threads']} threads",
             "", f"CPU: {c['cpu']['name']} ({c['cpu']['isa']}); native kernels: {c['native_kernels']}; "
             f"measured read bandwidth {c['read_bandwidth_gbs']} GB/s", "",
             "| precision | stored as | " + " | ".join(f"T={k} ms (x T=1)" for k in c["sizes"])
             + " | weight MB / token | GB/s at T=1 |",
             "|---|---|" + "---|" * len(c["sizes"]) + "---|---|"]
    for name, r in report["precisions"].items():
        cells = " | ".join(f"{r['forward_ms'][k]:.1f} ({r['relative_to_1'][k]:.2f}x)" for k in c["sizes"])
        lines.append(f"| {name} | {r['stored_as']} | {cells} | {r['weight_bytes_per_token'] / 1e6:.0f} | "
                     f"{r['effective_gbs_at_1']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["config"]["sizes"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in report["precisions"].items():
        ax1.plot(sizes, [r["forward_ms"][k] for k in sizes], marker="o", label=name)
        ax2.plot(sizes, [r["relative_to_1"][k] for k in sizes], marker="o", label=name)
    ax1.set_title("forward of T tokens (ms)")
    ax2.set_title("cost relative to T = 1")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward (T)")
        ax.legend()
    fig.suptitle(f"{report['config']['model']}: verification is free only while memory-bound")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
