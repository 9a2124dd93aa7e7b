"""`ar` tokens/s on a quiet box and on a box shared with another busy process, per OpenMP
wait policy (actors/threads.py). Not a test: a benchmark, written to report.{json,md,png}.

    python -m benchmarks.shared_cores --model qwen2.5-coder-1.5b --out bench-out/shared_cores

Each (policy, repetition) runs in a fresh process (the wait policy is read once, when
OpenMP loads), in rotating order; inside it, `ar` decodes the same prompt quiet, then
beside each competitor in turn:
- `torch-2-threads`: another 2-thread torch job (matmuls), with OpenMP's default waiting;
- `python-1-core`: a pure-Python busy loop on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster.reporting import save_report

POLICIES = {  # name -> environment of the decoding process
    "default": {"SPECRAY_OMP_WAIT": "default"},  # OpenMP's own defaults: the "before"
    "short-spin": {},  # specray's policy (actors/threads.py): the "after"
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
}
COMPETITORS = {
    "torch-2-threads": "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n",
    "python-1-core": "while True:\n    pass\n",
}
PROMPT = "Write a Python function that merges two sorted lists into one sorted list."


def _die_with_parent() -> None:
    """A competitor must not outlive the benchmark (an orphaned busy loop voids later runs)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def competitor_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY")}
    env["SPECRAY_OMP_WAIT"] = "default"
    return env


def worker(model: str, tokens: int) -> dict:
    from actors import threads
    from cluster.engine import EngineConfig, LocalEngine
    from cluster.local import DecodeConfig

    engine = LocalEngine(EngineConfig(model), progress=False)
    ids = engine.encode(PROMPT, chat=True)
    cfg = DecodeConfig(max_new_tokens=tokens)

    def rate() -> float:
        return engine.generate(ids, cfg, speculative=False).stats.tokens_per_s

    rate()  # warm-up
    out = {"quiet": rate(), "threading": threads.describe()}
    for name, code in COMPETITORS.items():
        comp = subprocess.Popen([sys.executable, "-c", code], env=competitor_env(), preexec_fn=_die_with_parent)
        try:
            time.sleep(2.0)  # let it get going
            out[name] = rate()
        finally:
            comp.kill()
            comp.wait()
        time.sleep(1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--out", default="bench-out/shared_cores")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.tokens)))
        return 0
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = [s for s in policies if s not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    runs: dict[str, list[dict]] = {name: [] for name in policies}
    total, done = args.reps * len(policies), 0
    for rep in range(args.reps):
        order = policies[rep % len(policies):] + policies[: rep % len(policies)]
        for name in order:
            env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
            env.update(POLICIES[name])
            proc = subprocess.run([sys.executable, "-m", "benchmarks.shared_cores", "--worker", "--model",
                                   args.model, "--tokens", str(args.tokens)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"worker for {name} failed:\n{proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            done += 1
            print(f"[{done}/{total}] {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[name][-1].items()
                                                            if isinstance(v, float)), file=sys.stderr, flush=True)
    report = make_report(args, runs)
    save_report(args.out, report, render, plot)
    return 0


def make_report(args, runs: dict[str, list[dict]]) -> dict:
    from actors.hardware import probe

    conditions = ["quiet", *COMPETITORS]
    rows = {}
    for name, rs in runs.items():
        mean = {c: sum(r[c] for r in rs) / len(rs) for c in conditions}
        rows[name] = {"tokens_per_s": {c: round(v, 3) for c, v in mean.items()},
                      "slowdown_vs_quiet": {c: round(mean["quiet"] / mean[c], 3) for c in COMPETITORS},
                      "threading": rs[0]["threading"], "runs": rs}
    return {"config": {"model": args.model, "tokens": args.tokens, "reps": args.reps, "prompt": PROMPT,
                       "cpu": probe().to_dict(),
                       "command": "python -m benchmarks.shared_cores " + " ".join(sys.argv[1:])},
            "policies": rows}


def render(report: dict) -> str:
    c = report["config"]
    lines = [f"# ar on shared cores: {c['model']}, {c['tokens']} tokens, {c['reps']} runs per policy",
             "", f"CPU: {c['cpu']['name']} ({c['cpu']['isa']})", "",
             "| policy | quiet tok/s | " + " | ".join(f"{k} tok/s (slowdown)" for k in COMPETITORS) + " |",
             "|---|---|" + "---|" * len(COMPETITORS)]
    for name, r in report["policies"].items():
        t, s = r["tokens_per_s"], r["slowdown_vs_quiet"]
        lines.append(f"| {name} | {t['quiet']:.2f} | "
                     + " | ".join(f"{t[k]:.2f} ({s[k]:.1f}x)" for k in COMPETITORS) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = ["quiet", *COMPETITORS]
    names = list(report["policies"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [report["policies"][name]["tokens_per_s"][c] for c in conditions]
        ax.bar([x + i * width for x in range(len(conditions))], vals, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(conditions))], conditions)
    ax.set_ylabel("ar tokens / s")
    ax.set_title(f"{report['config']['model']}: quiet vs a busy neighbour, per OpenMP wait policy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
