"""What Ray gave the actor this code runs in: its device and its CPUs."""

from __future__ import annotations

import os

import ray


def assigned_device() -> str:
    """Inside an actor: 'cuda:0' if Ray assigned it a GPU and torch sees CUDA, else 'cpu'.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU, so it is always cuda:0 in the actor.
    GPUs faked with ray.init(num_gpus=...) get ids too, but torch has no CUDA: then 'cpu'.
    """
    if not ray.is_initialized() or not ray.get_gpu_ids():
        return "cpu"
    import torch  # late: placement itself must not need torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def assigned_cpus() -> int:
    """Inside an actor: the CPUs Ray assigned it, at least 1 (for torch.set_num_threads).

    Outside a Ray worker (the driver, or no Ray at all) no Ray share applies, so it is the
    machine's core count.
    """
    if not ray.is_initialized():
        return os.cpu_count() or 1
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return os.cpu_count() or 1
    cpus = ctx.get_assigned_resources().get("CPU", 0.0)
    return max(1, int(cpus))
