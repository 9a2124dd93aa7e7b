"""Where one decoding step of a quantized model goes: torch layers, fused layers, the stack.

    python -m benchmarks.step_profile --model qwen2.5-coder-1.5b --out bench-out/step_profile

The model loads once as its GGUF file; the three layer forms (`SPECRAY_FUSED_LAYERS=0|layers|1`,
`actors.fused`: torch ops, native calls per layer, all layers in one native call)
alternate, `--rounds` times `--steps` one-token steps each after a `--context`-token
prefill, in one process. Reported per form: the step (min and median) and the time inside
each kind of call, per step: the quantized products (per weight group), the native layer
ops (or the one stack call), and for the torch form every ATen op the profiler sees (its
self time), grouped. The products' bytes give their bandwidth; the machine's own
streaming read bandwidth is measured alongside.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.quant_costs import machine
from cluster.reporting import save_report

NATIVE_OPS = ("rmsnorm", "rope_store", "attend_rows", "swiglu")


class CallTimer:
    """Wall time inside the native calls, by kind, while installed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list = []

    def wrap(self, owner, name: str, key) -> None:
        fn = getattr(owner, name)
        seconds = self.seconds

        def timed(*args, **kw):
            start = time.perf_counter()
            out = fn(*args, **kw)
            seconds[key(args) if callable(key) else key] += time.perf_counter() - start
            return out

        setattr(owner, name, timed)
        self._undo.append((owner, name, fn))

    def install(self) -> CallTimer:
        from actors import fused
        from actors.native import layer
        from actors.quantized import QuantLinear

        for op in NATIVE_OPS:
            self.wrap(fused.native_layer, op, op)
        names = {}  # a product's name: the linears it multiplies

        def product_name(args) -> str:
            prod = args[0]
            if id(prod) not in names:
                names[id(prod)] = "product " + "|".join(f"{lin.qweight.type_name} {lin.out_features}x{lin.in_features}"
                                                        for lin in prod.linears)
            return names[id(prod)]

        self.wrap(layer.Products, "__call__", product_name)
        self.wrap(layer.Stack, "__call__", "layer stack (products and layer ops, one call)")
        self.wrap(QuantLinear, "forward", lambda args: f"product {args[0].qweight.type_name} "
                                                       f"{args[0].out_features}x{args[0].in_features}")
        return self

    def remove(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)


def prefill(model, mode: str, context: int, cache) -> None:
    import torch

    os.environ["SPECRAY_FUSED_LAYERS"] = mode
    model._fused = None  # decided again on next use
    cache.length = 0
    model.forward_hidden(torch.arange(context) % 1000 + 10, cache, prefill=True)


def decode_steps(model, context: int, steps: int, cache) -> list[float]:
    """`steps` one-token steps, each from the same `context` cached tokens."""
    import torch

    times = []
    for _ in range(steps):
        cache.length = context
        start = time.perf_counter()
        model.forward(torch.tensor([42]), cache, last_only=True)
        times.append(time.perf_counter() - start)
    return times


def profile_form(model, mode: str, context: int, steps: int, cache) -> dict:
    """Per-call-kind ms per step: native calls timed by wrapping, ATen ops by the profiler."""
    import torch

    prefill(model, mode, context, cache)
    stack = model._fused_stack.stack if model._fused_stack is not None else None
    if stack is not None:  # the stack's own split: its products and its other layer ops, timed in C
        stack.timing = (ctypes.c_double * 2)()
    timer = CallTimer().install()
    try:
        with torch.profiler.profile() as prof:
            decode_steps(model, context, steps, cache)
    finally:
        timer.remove()
    per_step = {k: v / steps * 1e3 for k, v in timer.seconds.items()}
    if stack is not None:
        per_step["in the stack: products"] = stack.timing[0] / steps * 1e3
        per_step["in the stack: layer ops"] = stack.timing[1] / steps * 1e3
        stack.timing = None
    aten, calls = defaultdict(float), 0
    for ev in prof.key_averages():
        if ev.key.startswith("aten::"):
            aten[ev.key] += ev.self_cpu_time_total / 1e3 / steps  # us -> ms, per step
            calls += ev.count
    return {"calls_ms": dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
            "aten_self_ms": dict(sorted(aten.items(), key=lambda kv: -kv[1])[:12]),
            "aten_self_total_ms": sum(aten.values()), "aten_calls_per_step": calls / steps}


def main(argv: list[str] | None = None) -> int:

    from actors import fused, loading, native

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default="bench-out/step_profile")
    args = p.parse_args(argv)
    print(f"loading {args.model} (gguf) ...", file=sys.stderr, flush=True)
    model = loading.load(args.model, "gguf", progress=False).build()
    if not fused.applies(model):
        raise SystemExit(f"{args.model} as GGUF does not run fused layers here (native kernels: {native.variant()})")
    cache = model.new_cache(args.context + 8)
    forms = {"torch layers": "0", "fused layers": "layers", "fused stack": "1"}  # SPECRAY_FUSED_LAYERS
    steps = {name: [] for name in forms}
    rows = {}
    try:
        for r in range(args.rounds):  # interleaved, so drift hits both forms alike
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for name, on in forms.items():
                prefill(model, on, args.context, cache)
                steps[name] += decode_steps(model, args.context, args.steps, cache)
        for name, on in forms.items():
            ts = sorted(steps[name])
            rows[name] = {"step_ms_min": round(ts[0] * 1e3, 2),
                          "step_ms_median": round(statistics.median(ts) * 1e3, 2),
                          **profile_form(model, on, args.context, args.steps, cache)}
    finally:
        os.environ.pop("SPECRAY_FUSED_LAYERS", None)
    nbytes = sum(m.qweight.nbytes for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "bias"))
    report = {"config": {"model": args.model, "context": args.context, "steps": args.steps, "rounds": args.rounds,
                         **machine(), "product_bytes_per_step": nbytes,
                         "command": "python -m benchmarks.step_profile " + " ".join(sys.argv[1:])},
              "forms": rows}
    save_report(args.out, report, render, plot)
    return 0


def render(report: dict) -> str:
    c = report["config"]
    lines = [f"# one decoding step of {c['model']} (GGUF), {c['context']}-token context, {c['threads']} threads",
             "", f"CPU: {c['cpu']['name']} ({c['cpu']['isa']}); native kernels: {c['native_kernels']}; "
             f"read bandwidth {c['read_bandwidth_gbs']} GB/s; products read {c['product_bytes_per_step'] / 1e6:.0f} MB "
             "a step", ""]
    for name, r in report["forms"].items():
        products = sum(v for k, v in r["calls_ms"].items() if k.startswith("product"))
        stacked = sum(v for k, v in r["calls_ms"].items() if k.startswith("layer stack"))
        inside = [r["calls_ms"].get(f"in the stack: {k}", 0.0) for k in ("products", "layer ops")]
        work = (f"products {products:.1f} ms ({c['product_bytes_per_step'] / products / 1e6:.1f} GB/s)" if not stacked
                else f"all layers {stacked:.1f} ms in one call (its products {inside[0]:.1f} ms, its other layer ops "
                     f"{inside[1]:.1f} ms), lm_head {products:.1f} ms")
        lines += [f"## {name}: step {r['step_ms_min']:.1f} ms min, {r['step_ms_median']:.1f} ms median", "",
                  f"{work}; "
                  f"ATen self time {r['aten_self_total_ms']:.1f} ms over {r.get('aten_calls_per_step', 0):.0f} calls "
                  "(the call times come from profiled steps, "
                  "a little slower than the step times above)", "",
                  "| call | ms per step |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in r["calls_ms"].items()]
        lines += [f"| aten: {k[6:]} | {v:.2f} |" for k, v in r["aten_self_ms"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5))
    names = list(report["forms"])
    for i, name in enumerate(names):
        r = report["forms"][name]
        products = sum(v for k, v in r["calls_ms"].items() if k.startswith("product"))
        native_ops = sum(v for k, v in r["calls_ms"].items() if not k.startswith(("product", "layer stack",
                                                                                   "in the stack")))
        stacked = sum(v for k, v in r["calls_ms"].items() if k.startswith("layer stack"))
        inside = [r["calls_ms"].get(f"in the stack: {k}", 0.0) for k in ("products", "layer ops")]
        glue = max(0.0, stacked - sum(inside))  # inside the stack call, between its ops
        products, native_ops = products + inside[0], native_ops + inside[1]
        rest = max(0.0, r["step_ms_median"] - products - native_ops - glue)
        left = 0.0
        for part, width, color in (("quantized products", products, "tab:blue"),
                                   ("native layer ops", native_ops, "tab:green"),
                                   ("stack call, between its ops", glue, "tab:purple"),
                                   ("torch ops + Python", rest, "tab:red")):
            ax.barh(i, width, left=left, color=color, label=part if i == 0 else None)
            left += width
        ax.plot([r["step_ms_median"]] * 2, [i - 0.45, i + 0.45], color="black", linewidth=2,
                label="step, unprofiled (median)" if i == 0 else None)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("ms per decoding step (bars: calls timed in profiled steps)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(f"{report['config']['model']}: where a step goes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
