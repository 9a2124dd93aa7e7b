"""Load generator for the OpenAI endpoint: requests/s, time to first token and tokens/s
at several concurrencies, with and without speculation, in one run.

    python -m benchmarks.serve_load --serve deploy/serve.yaml --out benchmarks/results/serve_load

`--serve` starts `serve run CONFIG` for the run (and stops it after); without it, point
`--base-url` at a running endpoint. Loopback only: this is a benchmark, not a load test
of someone else's service. Every cell is bounded in requests and in time. Speculation
is switched per request (`"specray": {"speculative": false}`), so both modes hit the same
replica and actors; modes alternate within each concurrency level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import openai
import requests
import yaml

from cluster.bench import load_prompts

MODES = {"spec": True, "no-spec": False}


@dataclass
class Cell:
    mode: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    mean_accepted: list[float] = field(default_factory=list)
    draft_lengths: dict[str, int] = field(default_factory=dict)  # rounds per chosen draft length (batched replicas)

    def summary(self) -> dict:
        def pct(xs: list[float], q: float) -> float | None:
            return round(statistics.quantiles(xs, n=100)[int(q) - 1], 3) if len(xs) >= 2 else (
                round(xs[0], 3) if xs else None)

        return {
            "mode": self.mode, "concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
            "requests_per_s": round(self.requests / self.wall_s, 4) if self.wall_s else 0.0,
            "tokens_per_s": round(self.tokens / self.wall_s, 3) if self.wall_s else 0.0,
            "ttft_p50_s": pct(self.ttft_s, 50), "ttft_p90_s": pct(self.ttft_s, 90),
            "ttft_mean_s": round(statistics.fmean(self.ttft_s), 3) if self.ttft_s else None,
            "latency_mean_s": round(statistics.fmean(self.latency_s), 3) if self.latency_s else None,
            "mean_accepted": round(statistics.fmean(self.mean_accepted), 3) if self.mean_accepted else None,
            "wall_s": round(self.wall_s, 2),
            "draft_lengths": self.draft_lengths,
        }


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, speculative: bool,
                      cell: Cell) -> None:
    start = time.perf_counter()
    first = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"specray": {"speculative": speculative}})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.choices and chunk.model_extra.get("specray"):
                cell.mean_accepted.append(chunk.model_extra["specray"]["mean_accepted"])
            if chunk.usage is not None:
                cell.tokens += chunk.usage.completion_tokens
    except openai.OpenAIError as exc:
        cell.errors += 1
        print(f"  error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    cell.requests += 1
    cell.latency_s.append(time.perf_counter() - start)
    if first is not None:
        cell.ttft_s.append(first)


def draft_rounds(base_url: str) -> dict[str, int]:
    """The replica's rounds per chosen draft length so far (empty where it does not batch)."""
    try:
        health = requests.get(base_url.removesuffix("/v1") + "/health", timeout=10).json()
    except (requests.RequestException, ValueError):
        return {}
    return dict(health.get("decoder", {}).get("draft_lengths", {}))


async def run_cell(base_url: str, model: str, prompts: list[str], cell: Cell, count: int, max_tokens: int,
                   time_limit_s: float, api_key: str = "unused") -> None:
    """`count` requests, `cell.concurrency` in flight at a time, stopped at `time_limit_s`."""
    queue = list(range(count))
    start = time.perf_counter()

    async def worker(client: openai.AsyncOpenAI) -> None:
        while queue and time.perf_counter() - start < time_limit_s:
            i = queue.pop(0)
            await one_request(client, model, prompts[i % len(prompts)], max_tokens, MODES[cell.mode], cell)

    before = draft_rounds(base_url)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                  timeout=time_limit_s) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(cell.concurrency))),
                               timeout=time_limit_s * 2)
    cell.wall_s = time.perf_counter() - start
    after = draft_rounds(base_url)
    cell.draft_lengths = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}


def check_loopback(base_url: str) -> None:
    host = urllib.parse.urlparse(base_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--base-url must be a loopback address (127.0.0.1, localhost), got {host!r}")


def start_server(config: Path, log: Path) -> tuple[subprocess.Popen, str, str]:
    cfg = yaml.safe_load(config.read_text())
    port = cfg.get("http_options", {}).get("port", 8000)
    model = cfg["applications"][0]["args"].get("served_model_name") or cfg["applications"][0]["args"]["target"]
    serve = str(Path(sys.executable).parent / "serve")
    proc = subprocess.Popen([serve, "run", str(config)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1200
    print(f"starting `serve run {config}` (log: {log}) ...", flush=True)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve run exited with {proc.returncode}; see {log}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, f"{base}/v1", model
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"the endpoint was not healthy within 20 min; see {log}")


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode in MODES:
        rows = [c for c in cells if c["mode"] == mode]
        xs = [c["concurrency"] for c in rows]
        for ax, key, label in zip(axes, ("tokens_per_s", "ttft_p50_s", "requests_per_s"),
                                  ("generated tokens/s (all requests)", "time to first token p50 (s)",
                                   "requests/s")):
            ax.plot(xs, [c[key] or 0 for c in rows], marker="o", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("concurrent clients")
            ax.set_ylim(bottom=0)
            ax.set_title(label, fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    lines = ["| mode | concurrency | requests | errors | req/s | tokens/s | TTFT p50 (s) | TTFT p90 (s) | "
             "mean accepted |", "|---|---|---|---|---|---|---|---|---|"]
    for c in report["cells"]:
        lines.append(f"| {c['mode']} | {c['concurrency']} | {c['requests']} | {c['errors']} | "
                     f"{c['requests_per_s']} | {c['tokens_per_s']} | {c['ttft_p50_s']} | {c['ttft_p90_s']} | "
                     f"{c['mean_accepted']} |")
    lines.append("")
    lines.append("| concurrency | spec / no-spec tokens/s | spec / no-spec TTFT p50 |")
    lines.append("|---|---|---|")
    for level in report["config"]["concurrency"]:
        s, n = (next(c for c in report["cells"] if c["mode"] == m and c["concurrency"] == level) for m in MODES)
        ratio = round(s["tokens_per_s"] / n["tokens_per_s"], 3) if n["tokens_per_s"] else None
        ttft = round(s["ttft_p50_s"] / n["ttft_p50_s"], 3) if s["ttft_p50_s"] and n["ttft_p50_s"] else None
        lines.append(f"| {level} | {ratio} | {ttft} |")
    levels = report["config"]["concurrency"]
    if len(levels) > 1:
        lo, hi = min(levels), max(levels)
        lines += ["", f"| mode | tokens/s at {hi} / at {lo} | TTFT p50 at {hi} (s) | draft lengths chosen at {hi} "
                      "(k: rounds) |", "|---|---|---|---|"]
        for mode in MODES:
            a, b = (next(c for c in report["cells"] if c["mode"] == mode and c["concurrency"] == x) for x in (lo, hi))
            scale = round(b["tokens_per_s"] / a["tokens_per_s"], 2) if a["tokens_per_s"] else None
            lines.append(f"| {mode} | {scale} | {b['ttft_p50_s']} | {b.get('draft_lengths') or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="served model name (default: from --serve's config)")
    p.add_argument("--serve", type=Path, help="start `serve run CONFIG` for the run")
    p.add_argument("--prompts", default="benchmarks/prompts/spec_bench_20.jsonl")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=0, help="per cell (default: max(4, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit-s", type=float, default=600.0, help="per cell")
    p.add_argument("--out", type=Path, default=Path("bench-out/serve_load"))
    p.add_argument("--api-key", default="unused", help="the endpoint's API key, if it has one")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    if any(c < 1 for c in levels) or args.max_tokens < 1 or args.time_limit_s <= 0:
        raise SystemExit("--concurrency levels, --max-tokens and --time-limit-s must be positive")
    prompts = load_prompts(args.prompts, None)
    proc = None
    base_url, model = args.base_url, args.model
    args.out.mkdir(parents=True, exist_ok=True)
    if args.serve:
        proc, base_url, served = start_server(args.serve, args.out / "serve.log")
        model = model or served
    check_loopback(base_url)
    if model is None:
        raise SystemExit("name the served model with --model (or start it with --serve)")
    cells: list[Cell] = []
    try:
        # Warm both modes once (first-request costs are not what this measures).
        for mode in MODES:
            asyncio.run(run_cell(base_url, model, prompts, Cell(mode, 1), 1, 8, args.time_limit_s, args.api_key))
        for i, level in enumerate(levels):
            count = args.requests or max(4, 2 * level)  # two waves: later arrivals join a running batch
            for mode in (list(MODES) if i % 2 == 0 else list(reversed(MODES))):  # alternate who goes first
                cell = Cell(mode, level)
                print(f"[{len(cells) + 1}/{2 * len(levels)}] {mode:7s} concurrency {level:3d}: {count} requests "
                      f"x {args.max_tokens} tokens ...", flush=True)
                asyncio.run(run_cell(base_url, model, prompts, cell, count, args.max_tokens, args.time_limit_s,
                                     args.api_key))
                print(f"    {cell.summary()}", flush=True)
                cells.append(cell)
        write_report(args, base_url, model, levels, cells)
    finally:
        if proc is not None:
            stop_server(proc)
    return 0


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C lets `serve run` tear its application down; whatever is left after a
    minute (the Ray instance it started) is killed by pid."""
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in children:
        if child.is_running():
            child.kill()


def write_report(args: argparse.Namespace, base_url: str, model: str, levels: list[int], cells: list[Cell]) -> None:
    order = {m: i for i, m in enumerate(MODES)}
    summaries = sorted((c.summary() for c in cells), key=lambda c: (order[c["mode"]], c["concurrency"]))
    report = {"config": {"base_url": base_url, "model": model, "prompts": args.prompts, "concurrency": levels,
                         "max_tokens": args.max_tokens, "requests_per_cell": args.requests or "max(4, 2c)",
                         "serve_config": str(args.serve) if args.serve else None,
                         "machine": f"{platform.machine()} {platform.processor() or ''}".strip()},
              "cells": summaries}
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2))
    (args.out / "serve_load.md").write_text(markdown(report))
    plot(summaries, args.out / "serve_load.png")
    print(markdown(report))
    print(f"wrote {args.out}/serve_load.{{json,md,png}}")


if __name__ == "__main__":
    sys.exit(main())
