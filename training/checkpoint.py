"""What a resumable training command keeps on disk: training states (trained tensors with
their AdamW moments, in one safetensors file) and the work directory's small JSON records
(stage timings, cached chunk lists). Everything is written under a temporary name, flushed
and renamed, so a crash never leaves half a file under the final name and a rerun resumes
from whatever is whole."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from actors.paths import durable_replace


def save_state(path: Path, named: dict[str, torch.Tensor], opt: torch.optim.Optimizer, step: int,
               metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, p in named.items():
        tensors[name] = p.detach()
        st = opt.state.get(p, {})
        if st:
            tensors[f"{name}.exp_avg"] = st["exp_avg"]
            tensors[f"{name}.exp_avg_sq"] = st["exp_avg_sq"]
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={**(metadata or {}), "step": str(step)})
    durable_replace(tmp, path)


def load_state(path: Path, named: dict[str, torch.Tensor],
               opt: torch.optim.Optimizer) -> tuple[int, dict[str, str]]:
    """Copy the saved tensors into `named`, restore their moments; -> (step, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    step = int(meta["step"])
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(t[name])
            if f"{name}.exp_avg" in t:
                opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": t[f"{name}.exp_avg"],
                                "exp_avg_sq": t[f"{name}.exp_avg_sq"]}
    return step, meta


def add_time(work: Path, stage: str, seconds: float) -> dict:
    """Seconds spent per stage, summed over the runs that worked on it (timings.json)."""
    path = work / "timings.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[stage] = round(times.get(stage, 0.0) + seconds, 1)
    atomic_json(path, times)
    return times


def atomic_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    durable_replace(tmp, path)
