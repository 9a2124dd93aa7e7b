"""Linear kernels for the skinny matrix products of decoding, chosen by timing them here.

A decode step multiplies 1..16 rows of activations by every weight matrix. Which CPU
kernel reads a weight fastest depends on the CPU, the dtype, the weight's shape and the
row count (on one AMD EPYC oneDNN was 2-4x faster than MKL for few rows, except fp32 with
exactly 2 rows), so specray measures instead of assuming. For each shape class a model
uses (out x in, dtype) and each row count 1..16, `tune` times the candidate kernels on the
model's own weights of that shape (several layers in a row, as a forward streams them),
keeps the fastest, and caches the choice on disk next to the converted models, keyed by
CPU model, ISA, thread count and torch version. More than 16 rows use the choice for 16.

Candidates, only those the device can run (`candidates`):
- `aten`: F.linear. Always valid; what every Linear uses until tuned, and on GPUs.
- `mkl_col`: w @ x.T, the column form of the same GEMM, transposed back.
- `onednn`: torch.ops.mkldnn._linear_pointwise on the plain weight: fp32, and bf16 only
  where the capability probe (`actors.hardware.probe`) says the CPU runs bf16 natively.
A candidate that raises or disagrees with `aten` is never chosen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actors import hardware

log = logging.getLogger(__name__)

MAX_ROWS = 16
PASS_BYTES = 128 << 20  # weights read per timed pass; consecutive passes read different weights
REPS = 3  # timed passes per (candidate, rows); the fastest counts (interference only slows)
MARGIN = 0.03  # a kernel must beat the previous row count's choice by this much to replace it

KernelFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _aten(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


def _mkl_col(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    y = torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())
    return y.t().contiguous()


def _onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


KERNELS: dict[str, KernelFn] = {"aten": _aten, "mkl_col": _mkl_col, "onednn": _onednn}
DEFAULT = (_aten,) * MAX_ROWS  # Linear.kernels before tuning: index rows - 1


def candidates(dtype: torch.dtype, device: str, caps: hardware.Capabilities | None = None) -> list[str]:
    if device != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return ["aten"]
    names = ["aten", "mkl_col"]
    onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None) is not None
    if onednn and torch.backends.mkldnn.is_available():
        caps = caps or hardware.probe("cpu")
        if dtype == torch.float32 or (dtype == torch.bfloat16 and caps.native_bf16):
            names.append("onednn")
    return names


def shape_class(weight: Tensor) -> str:
    out_f, in_f = weight.shape
    return f"{in_f}x{out_f} {hardware.dtype_name(weight.dtype)}"


# --------------------------------------------------------------------------- tuning


def tune(linears: Iterable[nn.Module], threads: int | None = None, progress: bool = False,
         retune: bool = False) -> dict[str, list[str]]:
    """Give every linear (modules with `weight`, `bias`, `kernels`) the fastest kernel per
    row count for its shape class; returns {shape class: [kernel for rows 1..16]}."""
    linears = list(linears)
    if not linears:
        return {}
    device = linears[0].weight.device.type
    classes: dict[str, list[nn.Module]] = defaultdict(list)
    for lin in linears:
        classes[shape_class(lin.weight)].append(lin)
    if device != "cpu":  # one kernel (cuBLAS through F.linear): nothing to choose
        for lin in linears:
            lin.kernels = DEFAULT
        return {name: ["aten"] * MAX_ROWS for name in classes}
    threads = threads or torch.get_num_threads()
    caps = hardware.probe("cpu")
    path = cache_file(caps, threads)
    cached = {} if retune else read_cache(path)
    todo = [name for name in classes if name not in cached]
    measured = {}
    if todo:
        from tqdm import tqdm

        steps = sum(MAX_ROWS for _ in todo)
        with tqdm(total=steps, desc=f"timing linear kernels ({threads} threads)", disable=not progress,
                  unit="shape") as bar:
            for name in todo:
                weights = [lin.weight for lin in classes[name]]
                measured[name] = _choose(weights, candidates(weights[0].dtype, "cpu", caps), bar)
        write_cache(path, caps, threads, measured)
    choices = {**cached, **measured}
    for name, lins in classes.items():
        fns = tuple(KERNELS[k] for k in choices[name])
        for lin in lins:
            lin.kernels = fns
    return {name: choices[name] for name in classes}


@torch.inference_mode()
def _choose(weights: list[Tensor], names: list[str], bar) -> list[str]:
    """Fastest valid candidate for each row count 1..16 on these weights. Near-ties keep
    the previous row count's kernel, so noise does not scatter the choice."""
    w0 = weights[0]
    passes = _passes(weights)
    gen = torch.Generator().manual_seed(0)
    chosen: list[str] = []
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(rows, w0.shape[1], generator=gen).to(w0.dtype)
        valid = [n for n in names if _agrees(KERNELS[n], x, w0[:256])]  # a slice: same kernel, cheap check
        best = {n: float("inf") for n in valid}
        for rep in range(REPS if len(valid) > 1 else 0):
            for i, n in enumerate(valid[rep % len(valid):] + valid[: rep % len(valid)]):
                fn, group = KERNELS[n], passes[(rep * len(valid) + i) % len(passes)]
                start = time.perf_counter()
                for w in group:
                    fn(x, w, None)
                # per byte: passes may differ in size
                best[n] = min(best[n], (time.perf_counter() - start) / sum(w.numel() for w in group))
        pick = min(valid, key=lambda n: best[n])
        if chosen and chosen[-1] in best and best[chosen[-1]] <= best[pick] * (1 + MARGIN):
            pick = chosen[-1]
        chosen.append(pick)
        bar.update()
    return chosen


def _passes(weights: list[Tensor]) -> list[list[Tensor]]:
    """The class's weights in groups of about PASS_BYTES (a big matrix split by rows), so a
    timed pass streams memory the previous pass did not touch, as a forward does."""
    pieces = []
    for w in weights:
        rows = max(1, PASS_BYTES // (w.shape[1] * w.element_size()))
        pieces += list(w.split(rows))
    passes, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += piece.numel() * piece.element_size()
        if size >= PASS_BYTES:
            passes.append(current)
            current, size = [], 0
    if current and (not passes or size >= PASS_BYTES // 2):
        passes.append(current)
    return passes


def _agrees(fn: KernelFn, x: Tensor, w: Tensor) -> bool:
    try:
        y = fn(x, w, None)
    except RuntimeError as exc:  # e.g. oneDNN refusing a dtype it cannot run here
        log.info("kernel %s unavailable for %s: %s", fn.__name__, shape_class(w), str(exc).splitlines()[0])
        return False
    ref = F.linear(x.float(), w.float())
    tol = 1e-3 if x.dtype == torch.float32 else 3e-2
    return y.shape == ref.shape and torch.allclose(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


# --------------------------------------------------------------------------- the cache


def cache_key(caps: hardware.Capabilities, threads: int) -> dict:
    return {"cpu": caps.name, "isa": caps.isa, "native_bf16": caps.native_bf16, "threads": threads,
            "torch": torch.__version__,
            # these change what oneDNN / MKL run, so choices measured under them are their own
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "")}


def cache_file(caps: hardware.Capabilities, threads: int) -> Path:
    from actors.paths import cache_root

    key = json.dumps(cache_key(caps, threads), sort_keys=True)
    return cache_root() / "kernels" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def read_cache(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    choices = data.get("choices", {}) if isinstance(data, dict) else {}
    return {name: ks for name, ks in choices.items()
            if isinstance(ks, list) and len(ks) == MAX_ROWS and all(k in KERNELS for k in ks)}


def write_cache(path: Path, caps: hardware.Capabilities, threads: int, measured: dict[str, list[str]]) -> None:
    from actors.paths import durable_replace, file_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        choices = {**read_cache(path), **measured}  # another process may have added shapes
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": cache_key(caps, threads), "choices": choices}, indent=1))
        durable_replace(tmp, path)


def summarize(choices: dict[str, list[str]]) -> dict[str, str]:
    """{shape class: "1: onednn, 2: mkl_col, 3-16: onednn"}: row ranges per kernel."""
    out = {}
    for name, ks in choices.items():
        parts, start = [], 0
        for i in range(1, len(ks) + 1):
            if i == len(ks) or ks[i] != ks[start]:
                rows = f"{start + 1}" if i - 1 == start else f"{start + 1}-{i}"
                parts.append(f"{rows}: {ks[start]}")
                start = i
        out[name] = ", ".join(parts)
    return out
