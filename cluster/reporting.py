"""Where a benchmark's report goes: report.json, report.md and report.png in one folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def save_report(out: str | Path, report: dict, render: Callable[[dict], str],
                plot: Callable[[dict, Path], None]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render(report))
    plot(report, out / "report.png")
    print(render(report))
