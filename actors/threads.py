"""How this process's OpenMP threads wait for work: spin briefly, then sleep.

torch's CPU kernels run on OpenMP (GNU libgomp in the Linux wheels). By default a thread
that finishes its share of a parallel region spins for a long time waiting for the
others. On a 2-core box shared with another busy process that is the worst case: a
forward has hundreds of parallel regions, each waits for the thread that lost its core,
and while it waits the spinning thread burns the core the other process needs. Measured
on the 1.5B target (BENCHMARKS.md, "Shared cores"): about 7x slower than quiet with the
default policy, about 2x with a short spin.

So every specray process caps the spin (`GOMP_SPINCOUNT`, and `KMP_BLOCKTIME` for Intel's
OpenMP), unless the user set these variables. libgomp reads them once, when it loads, so
`apply()` must run before torch is imported: the packages' `__init__` call it.
`SPECRAY_OMP_WAIT=default` leaves OpenMP's own defaults (the shared-cores benchmark's "before").
"""

from __future__ import annotations

import os
import sys

POLICY = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}  # ~a few microseconds of spinning
OFF_ENV = "SPECRAY_OMP_WAIT"
_state: dict[str, object] = {}


def apply() -> None:
    """Set the wait policy for this process (and its children), once, before torch loads."""
    if _state:
        return
    _state["torch_was_loaded"] = "torch" in sys.modules
    _state["user_set"] = sorted(k for k in POLICY if k in os.environ)
    if os.environ.get(OFF_ENV) == "default":
        return
    for key, value in POLICY.items():
        os.environ.setdefault(key, value)


def describe() -> dict:
    """What this process runs with, for stats and bench reports."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "omp_wait": {k: os.environ.get(k) for k in POLICY},
        # False when torch was imported before specray: OpenMP kept its default (long) spin.
        "omp_wait_applied": not _state.get("torch_was_loaded", True) and os.environ.get(OFF_ENV) != "default",
        "user_set": _state.get("user_set", []),
    }
