"""Native kernels for GGUF weight blocks (`ggml_blocks.c`) and the float work around them
in a decoder layer (`layer_ops.c`, used through `actors.native.layer`), and the loop over a
model's fused layers (`stack_ops.c`, `actors.fused.FusedStack`), with their parallel loops on
one process-wide team of threads (`pool.c`, not OpenMP: its comment says why), built here,
loaded with ctypes.

The C sources are compiled at first use with the machine's C compiler, once per
instruction-set variant, and cached under `~/.cache/specray/native/`:
- `scalar`: plain C, any x86-64 (or other) CPU;
- `avx2`: AVX2 + FMA + F16C integer dot products;
- `avx512vnni`: AVX-512 VNNI (`vpdpbusd`) dot products.
`variant()` picks the best one this CPU runs (from /proc/cpuinfo flags), or the one
`SPECRAY_NATIVE_ISA` names (tests force every variant the machine can run). Every variant
computes bitwise the same result. Without a working compiler (none found, `$CC` naming a
command that is not there, a build that fails or outruns `COMPILE_TIMEOUT_S`),
`available()` is False and GGUF models fall back to dequantized weights (slower, said so
in a warning). A cached library that does not load (a crash mid-write, a foreign file) is
built again.

No torch headers: the library takes raw pointers, so it builds in about a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("ggml_blocks.c", "layer_ops.c", "stack_ops.c", "pool.c"))
HEADERS = (Path(__file__).with_name("pool.h"),)  # in the cache key too: a changed header builds anew
ISA_ENV = "SPECRAY_NATIVE_ISA"
COMMON_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-lm"]
VARIANTS: dict[str, tuple[list[str], set[str]]] = {  # name -> (compiler flags, cpu flags it needs)
    "scalar": ([], set()),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "avx512vnni": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                   {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
}
PREFERENCE = ("avx512vnni", "avx2", "scalar")
COMPILE_TIMEOUT_S = 300.0  # a compiler that hangs must not hold the build lock (and every start) forever

# GGML quantization type ids (gguf.GGMLQuantizationType) this library computes on
Q4_0, Q5_0, Q8_0, Q4_K, Q6_K = 2, 6, 8, 12, 14
BLOCKS = {Q4_0: (32, 18), Q5_0: (32, 22), Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210)}
NAMES = {Q4_0: "Q4_0", Q5_0: "Q5_0", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable_variants() -> list[str]:
    """The variants this CPU can run, best first."""
    return [v for v in PREFERENCE if VARIANTS[v][1] <= cpu_flags()]


def variant() -> str:
    """The variant to run: the best this CPU runs, or SPECRAY_NATIVE_ISA's (`none`: no
    native kernels at all, as on a machine without a C compiler)."""
    forced = os.environ.get(ISA_ENV, "").strip()
    if forced == "none":
        return "none"
    if forced:
        if forced not in VARIANTS:
            raise ValueError(f"{ISA_ENV} must be one of {', '.join(VARIANTS)}, none; got {forced!r}")
        if forced not in runnable_variants():
            raise ValueError(f"{ISA_ENV}={forced}: this CPU lacks {sorted(VARIANTS[forced][1] - cpu_flags())}")
        return forced
    return runnable_variants()[0]


def compiler() -> list[str] | None:
    """The C compiler as a command: `$CC` split as a shell would (`ccache gcc`), else the
    first of gcc, cc, clang found."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    return [found] if found else None


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    """`cmd`'s result, or None (logged) if it cannot start or outruns `timeout`."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("GGUF kernels: %s did not run (%s)", " ".join(cmd), e)
        return None


def _load(path: Path, name: str) -> ctypes.CDLL | None:
    """The library at `path` with its signatures declared, or None if it is not ours whole."""
    try:
        lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.specray_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int, ptr]
        lib.specray_matmul.restype = ctypes.c_int
        lib.specray_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ptr]
        lib.specray_dequantize.restype = None
        lib.specray_scratch_bytes.argtypes = [i64, i64]
        lib.specray_scratch_bytes.restype = i64
        lib.specray_variant.restype = ctypes.c_int
        lib.specray_matmul_many.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_int,
                                            ptr]
        lib.specray_matmul_many.restype = ctypes.c_int
        lib.specray_rmsnorm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
        lib.specray_rmsnorm.restype = None
        lib.specray_rope_store.argtypes = [ptr, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr,
                                           ptr, i64, i64]
        lib.specray_rope_store.restype = None
        lib.specray_attend_rows.argtypes = [ptr, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr, i64,
                                            ptr, ptr, ptr, ptr, ctypes.c_float, ptr, ctypes.c_int]
        lib.specray_attend_rows.restype = ctypes.c_int
        lib.specray_swiglu.argtypes = [ptr, i64, i64, ptr]
        lib.specray_swiglu.restype = None
        lib.specray_stack_workspace.argtypes = [ptr, i64]
        lib.specray_stack_workspace.restype = i64
        lib.specray_stack_forward.argtypes = [ptr, ctypes.c_int, ptr, ptr, ctypes.c_int, ptr, i64, ctypes.c_int, ptr,
                                              ptr]
        lib.specray_stack_forward.restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        log.warning("GGUF kernels: the cached %s does not load (%s)", path, e)
        return None
    if lib.specray_variant() != list(VARIANTS).index(name):  # the flags did not reach the preprocessor as meant
        log.warning("GGUF kernels %s built as variant %d", name, lib.specray_variant())
        return None
    return lib


def _build(cc: list[str], out: Path, flags: list[str], name: str) -> bool:
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = _run([*cc, *map(str, SOURCES), "-o", str(tmp), *flags], COMPILE_TIMEOUT_S)
    if proc is None or proc.returncode != 0:
        if proc is not None:
            log.warning("could not build the %s GGUF kernels with %s: %s", name, " ".join(cc), proc.stderr[-500:])
        tmp.unlink(missing_ok=True)
        return False
    from actors.paths import durable_replace

    durable_replace(tmp, out)
    return True


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled variant `name` (built on first use, cached on disk), or None."""
    from actors.paths import cache_root, file_lock

    cc = compiler()
    version = _run([*cc, "--version"], 30) if cc else None
    if version is None:
        return None
    flags = COMMON_FLAGS + VARIANTS[name][0]
    text = [*(src.read_text() for src in (*SOURCES, *HEADERS)), " ".join(flags), *version.stdout.splitlines()[:1]]
    key = hashlib.sha1("\n".join(text).encode()).hexdigest()[:16]
    out = cache_root() / "native" / key / f"ggml_blocks_{name}.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{name}.lock"):
        if out.exists() and (lib := _load(out, name)) is not None:
            return lib
        out.unlink(missing_ok=True)  # absent, or cached but broken: build it (again)
        if not _build(cc, out, flags, name):
            return None
    return _load(out, name)


def available(name: str | None = None) -> bool:
    name = name or variant()
    return name != "none" and library(name) is not None


def why_unavailable() -> str:
    if variant() == "none":
        return f"{ISA_ENV}=none"
    return "no C compiler found" if compiler() is None else "the build failed or timed out (see the log)"


def row_bytes(qtype: int, k: int) -> int:
    size, nbytes = BLOCKS[qtype]
    if k % size:
        raise ValueError(f"{NAMES[qtype]} rows hold blocks of {size} values; {k} is not a multiple")
    return k // size * nbytes


def matmul(qtype: int, x: torch.Tensor, blocks: torch.Tensor, n: int, k: int, threads: int | None = None,
           name: str | None = None) -> torch.Tensor:
    """x [M, k] float32 @ W.T, W [n, k] stored as GGUF blocks (uint8 [n, row_bytes])."""
    lib = library(name or variant())
    x = x.contiguous()
    if x.dtype != torch.float32:
        x = x.float()
    m = x.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    scratch = torch.empty(lib.specray_scratch_bytes(m, k), dtype=torch.uint8)
    code = lib.specray_matmul(qtype, x.data_ptr(), m, k, blocks.data_ptr(), n, row_bytes(qtype, k),
                              out.data_ptr(), threads or torch.get_num_threads(), scratch.data_ptr())
    if code != 0:
        raise ValueError(f"GGUF matmul refused its arguments (code {code}): {NAMES.get(qtype, qtype)}, k={k}")
    return out


def dequantize(qtype: int, blocks: torch.Tensor, n: int, k: int, rows: torch.Tensor | None = None,
               name: str | None = None) -> torch.Tensor:
    """The weights as the file defines them, float32 [len(rows) or n, k]."""
    lib = library(name or variant())
    count = n if rows is None else rows.numel()
    out = torch.empty(count, k, dtype=torch.float32)
    idx = None if rows is None else rows.to(torch.int64).contiguous()
    if idx is not None and count and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"row index out of range for {n} rows")
    lib.specray_dequantize(qtype, blocks.data_ptr(), count, k, row_bytes(qtype, k),
                           None if idx is None else idx.data_ptr(), out.data_ptr())
    return out
