"""Where the test suite's time goes: per test and per module, from pytest's JUnit XML.

    python -m pytest ... --junitxml=out/suite.xml
    python -m benchmarks.suite_times out/before.xml out/after.xml --labels before,after --out out/

Prints each run's total test time and its slowest tests and modules, and writes
`suite_times.md` and `suite_times.png` (the slowest modules, one bar per run) to --out.
Test time is the sum of the tests' own times (setup + call + teardown); with two xdist
workers the wall time is about half of it, and pytest prints that on its last line.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def read_times(path: str) -> dict[str, float]:
    """test node id -> seconds, from a JUnit XML file."""
    times: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        # classname is "tests.actors.test_x", or "tests.actors.test_x.TestClass"
        parts = case.get("classname", "").split(".")
        cls = [parts.pop()] if len(parts) > 1 and parts[-1][:1].isupper() else []
        node = "::".join(["/".join(parts) + ".py", *cls, case.get("name", "")])
        times[node] = times.get(node, 0.0) + float(case.get("time", 0.0))
    return times


def by_module(times: dict[str, float]) -> dict[str, float]:
    modules: dict[str, float] = defaultdict(float)
    for node, seconds in times.items():
        modules[node.split("::")[0]] += seconds
    return dict(modules)


def table(rows: list[tuple[str, list[float]]], labels: list[str]) -> list[str]:
    lines = ["| | " + " | ".join(f"{label} s" for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    lines += [f"| `{name}` | " + " | ".join(f"{s:.1f}" if s else "-" for s in secs) + " |" for name, secs in rows]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("xml", nargs="+", help="JUnit XML files, one per run")
    ap.add_argument("--labels", help="comma-separated names of the runs (default: the file names)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", type=Path, help="folder for suite_times.md and suite_times.png")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(x).stem for x in args.xml]
    if len(labels) != len(args.xml):
        ap.error(f"--labels names {len(labels)} runs, {len(args.xml)} files given")
    runs = [read_times(x) for x in args.xml]
    modules = [by_module(t) for t in runs]

    def slowest(dicts: list[dict[str, float]]) -> list[tuple[str, list[float]]]:
        names = sorted({n for d in dicts for n in d}, key=lambda n: -max(d.get(n, 0.0) for d in dicts))
        return [(n, [d.get(n, 0.0) for d in dicts]) for n in names[: args.top]]

    lines = ["Test time (sum over tests): " + ", ".join(
        f"{label} {sum(t.values()) / 60:.1f} min ({len(t)} tests)" for label, t in zip(labels, runs)), "",
        "Slowest modules:", "", *table(slowest(modules), labels), "",
        "Slowest tests:", "", *table(slowest(runs), labels)]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "suite_times.md").write_text("\n".join(lines) + "\n")
        plot(slowest(modules), labels, args.out / "suite_times.png")


def plot(rows: list[tuple[str, list[float]]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    height = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ax.barh([r + i * height for r in range(len(rows))], [secs[i] for _, secs in rows], height, label=label)
    ax.set_yticks([r + 0.4 - height / 2 for r in range(len(rows))], [name.removeprefix("tests/") for name, _ in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (sum of the module's tests)")
    ax.set_title("Test suite: slowest modules")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
