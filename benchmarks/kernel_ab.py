"""Two (or more) builds of the GGUF kernels against each other, on a real model's weights.

    python -m benchmarks.kernel_ab --libs old.so,new.so [--rows 1] [--model qwen2.5-coder-1.5b]

Build each library from a version of `actors/native/*.c` first, e.g.

    gcc -O3 -std=gnu11 -fPIC -shared -pthread -ffp-contract=off -mavx2 -mfma -mf16c \\
        -mavx512f -mavx512bw -mavx512vl -mavx512vnni actors/native/*.c -o new.so -lm

(drop the -mavx512* flags for the AVX2 variant). Every quantized product of one forward
(all the model's linears, `--rows` activation rows) runs through each library in turn,
`--reps` rounds interleaved, so drift hits all alike; reported: min and median ms per
forward's products, and whether every library gives bitwise the first one's outputs (a
kernel change must not change a bit).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from actors import loading, native
    from actors.quantized import QuantLinear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--libs", required=True, help="comma-separated shared libraries built from actors/native")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    libs = {}
    for path in args.libs.split(","):
        fn = ctypes.CDLL(path).specray_matmul
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int, ptr]
        libs[path] = fn
    print(f"loading {args.model} (gguf) ...", file=sys.stderr, flush=True)
    model = loading.load(args.model, "gguf", progress=False).build()
    weights = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.rows, w.k, generator=gen) for w in weights]
    outs = {path: [torch.empty(args.rows, w.n) for w in weights] for path in libs}
    scratch = torch.empty(1 << 24, dtype=torch.uint8)

    def forward(path: str) -> float:
        fn, start = libs[path], time.perf_counter()
        for w, x, o in zip(weights, xs, outs[path]):
            code = fn(w.qtype, x.data_ptr(), args.rows, w.k, w.blocks.data_ptr(), w.n, native.row_bytes(w.qtype, w.k),
                      o.data_ptr(), threads, scratch.data_ptr())
            if code != 0:
                raise SystemExit(f"{path} refused {w.type_name} [{w.n}, {w.k}] (code {code})")
        return time.perf_counter() - start

    times = {path: [] for path in libs}
    for _ in range(args.reps):
        for path in libs:
            times[path].append(forward(path))
    first = next(iter(libs))
    nbytes = sum(w.nbytes for w in weights)
    print(f"{args.model}: {len(weights)} products, {nbytes / 1e6:.0f} MB, {args.rows} row(s), {threads} threads")
    for path, ts in times.items():
        same = all(torch.equal(a, b) for a, b in zip(outs[first], outs[path]))
        med = statistics.median(ts)
        print(f"{path}: min {min(ts) * 1e3:.1f} ms, median {med * 1e3:.1f} ms ({nbytes / med / 1e9:.1f} GB/s), "
              f"x{med / statistics.median(times[first]):.3f} of the first, bitwise equal to it: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
