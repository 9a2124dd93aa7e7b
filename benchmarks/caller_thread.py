"""One forward's GGUF products called from the main thread and from a second thread, interleaved.

    python -m benchmarks.caller_thread [--model qwen2.5-coder-1.5b] [--reps 8]

A specray process loads on its main thread and decodes on another (the serial decoder's
loop, a Serve replica). With the kernels' loops on OpenMP that cost a decoding step about
a third more on a 2-vCPU Zen 3 (libgomp's per-thread pools: once a process holds more
pool threads than CPUs they sleep at every barrier); on the kernels' own team
(`actors/native/pool.c`) both callers should take the same time. Reported: min and median
ms per forward for each caller.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from actors import loading
    from actors.quantized import QuantLinear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)
    print(f"loading {args.model} (gguf) ...", file=sys.stderr, flush=True)
    model = loading.load(args.model, "gguf", progress=False).build()
    weights = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
    xs = [torch.randn(1, w.k, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(weights)]

    def forwards(into: list[float]) -> None:
        for _ in range(3):
            start = time.perf_counter()
            for w, x in zip(weights, xs):
                w.matmul(x)
            into.append(time.perf_counter() - start)

    times: dict[str, list[float]] = {"main thread": [], "second thread": []}
    for rep in range(args.reps):
        forwards(times["main thread"])
        caller = threading.Thread(target=forwards, args=(times["second thread"],))
        caller.start()
        caller.join()
        print(f"round {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    print(f"{args.model}: {len(weights)} products at one row, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        print(f"{name}: min {min(ts) * 1e3:.1f} ms, median {statistics.median(ts) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
