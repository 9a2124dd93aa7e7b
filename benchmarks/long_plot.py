"""One plot of step time against context from several `specray bench-long` runs of one pair
(a 16k prefill costs minutes here, so contexts are often benched in separate runs).

    python -m benchmarks.long_plot --out benchmarks/results/tidal/fp32.png \
        benchmarks/results/tidal/fp32-4k/report.json benchmarks/results/tidal/fp32-16k/report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.bench_long import plot


def merge(paths: list[str]) -> dict:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    methods = reports[0]["config"]["methods"]
    for p, r in zip(paths, reports):
        if r["config"]["methods"] != methods or r["config"]["target"] != reports[0]["config"]["target"]:
            raise ValueError(f"{p}: another target or method list than {paths[0]}; plot runs of one bench")
    merged = {**reports[0], "contexts": {}, "prefill": {}}
    layouts = dict.fromkeys(r["config"]["tidal_target"] for r in reports)  # runs may differ in layout
    merged["config"] = {**reports[0]["config"], "tidal_target": " / ".join(layouts)}
    for r in reports:
        merged["contexts"].update(r["contexts"])
        merged["prefill"].update(r["prefill"])
    merged["contexts"] = dict(sorted(merged["contexts"].items(), key=lambda kv: int(kv[0])))
    return merged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    plot(merge(args.reports), Path(args.out))


if __name__ == "__main__":
    main()
