"""What the device in front of us can run natively: the one capability probe, and the
dtype choices that follow from it.

Nothing in specray assumes an instruction set. `probe(device)` asks the device: on a CPU,
oneDNN's own bf16 check *and* a real bf16 inner product (some CPUs, e.g. AVX2-only Zen 3,
have no bf16 inner product at all: oneDNN refuses to create one); on CUDA, torch's bf16
check. Each Ray actor calls it on its own device, since nodes of one cluster differ.

`SPECRAY_NATIVE_BF16=0|1` forces the answer, so tests run every branch on any CPU.
(`ONEDNN_MAX_CPU_ISA=AVX2` goes further and makes oneDNN itself behave like an AVX2 CPU.)
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

FORCE_BF16_ENV = "SPECRAY_NATIVE_BF16"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # dense
QUANTIZED = ("int8", "int4", "gguf")  # GGUF blocks on the native kernels (actors/quantized.py)
DTYPE_CHOICES = ("file", "auto", *DTYPES, *QUANTIZED)
# `file`: the model as its files store it (a GGUF file: its own blocks; else float32). The
# target's default, so a built-in GGUF decodes as llama.cpp would run it.


@dataclass(frozen=True)
class Capabilities:
    device: str  # "cpu" or "cuda:N"
    name: str  # CPU model name, or GPU name
    isa: str  # ATen's CPU capability ("AVX512", "AVX2", ...), or "sm_XY"
    native_bf16: bool
    forced: bool  # native_bf16 came from SPECRAY_NATIVE_BF16, not from the hardware

    def to_dict(self) -> dict:
        return asdict(self)


def probe(device: str | torch.device = "cpu") -> Capabilities:
    """The device's capabilities (hardware part cached per process; the override is not)."""
    caps = _probe_hardware(str(torch.device(device)))
    forced = os.environ.get(FORCE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return Capabilities(caps.device, caps.name, caps.isa, forced == "1", True)
    if forced:
        raise ValueError(f"{FORCE_BF16_ENV} must be 0 or 1, got {forced!r}")
    return caps


@functools.cache
def _probe_hardware(device: str) -> Capabilities:
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return Capabilities(device, torch.cuda.get_device_name(index), f"sm_{major}{minor}",
                            bool(torch.cuda.is_bf16_supported()), False)
    return Capabilities("cpu", cpu_model_name(), torch.backends.cpu.get_cpu_capability(), _cpu_bf16_works(), False)


def _cpu_bf16_works() -> bool:
    """oneDNN says it has bf16 and a bf16 inner product really runs."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    pointwise = getattr(mkldnn, "_linear_pointwise", None)
    if check is None or pointwise is None or not torch.backends.mkldnn.is_available() or not check():
        return False
    try:
        x, w = torch.ones(2, 32, dtype=torch.bfloat16), torch.ones(16, 32, dtype=torch.bfloat16)
        return bool((pointwise(x, w, None, "none", [], "") == 32).all())
    except RuntimeError:  # "could not create a primitive descriptor ..."
        return False


@functools.cache
def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def check_dtype_name(name: str, what: str = "dtype") -> str:
    if name not in DTYPE_CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return name


def resolve_dtype(name: str, device: str | torch.device = "cpu", has_gguf: bool = False) -> str:
    """The concrete precision `name` means on `device`.

    `file`, the model as its files store it: a GGUF file (`has_gguf`) keeps its own blocks
    where the native kernels run (CPUs that build them), anything else is float32.
    `auto`, the cheapest form the device runs fast: on a CPU where the native GGUF kernels
    build, the model's own GGUF quantization (`has_gguf`) or else int8; otherwise bf16
    where the device runs it natively, else fp32. An explicit bf16 on a device without
    native bf16 still works (slower kernels), with a one-line warning; quantized names on
    a GPU load dense bf16 (the native kernels are CPU-only), with a warning too."""
    from actors import native

    check_dtype_name(name)
    caps = probe(device)
    on_cpu = caps.device == "cpu"
    if name == "file":
        return "gguf" if has_gguf and on_cpu and native.available() else "float32"
    if name == "auto":
        if on_cpu and native.available():
            return "gguf" if has_gguf else "int8"
        return "bfloat16" if caps.native_bf16 else "float32"
    if name in QUANTIZED and not on_cpu:
        _warn_once(f"--dtype {name}: the GGUF kernels run on CPUs; on {caps.device} the weights load as bfloat16")
        return "bfloat16"
    if name in QUANTIZED and not native.available():
        _warn_once(f"--dtype {name}: no native GGUF kernels here ({native.why_unavailable()}); the weights run "
                   "dequantized to float32, slower")
    if name == "bfloat16" and not caps.native_bf16:
        _warn_once(f"bfloat16 requested on {caps.name} ({caps.device}), which has no native bf16: running "
                   "with slower kernels; --draft-dtype auto picks another form here")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)
