"""Shared fixtures: tiny random model pairs (cheap), and one loaded built-in pair per process."""

from __future__ import annotations

import pytest

import actors  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

import actors.loading  # noqa: E402
from actors import tiny  # noqa: E402

# Tiny models are all overhead: one thread avoids OpenMP spin-waits on a busy 2-core box.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`cuda` tests run where torch sees a GPU (benchmarks/gpu_check.sh), else skip."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family, **kw) -> path of a seeded tiny model, created once per session."""
    root = tmp_path_factory.mktemp("tiny")

    def make(family: str = "qwen2", **kw) -> str:
        name = family + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
        return str(tiny.make_tiny(root / name, family, **kw))

    return make


@pytest.fixture(scope="session")
def tiny_linear(tiny_dir, tmp_path_factory):
    """tiny_linear(family, group=4, conv=3, seed=0, **base_kw) -> a linearized tiny model's
    directory (its base: tiny_dir(family, **base_kw)), created once per session."""
    root = tmp_path_factory.mktemp("tiny-linear")

    def make(family: str = "qwen2", group: int = 4, conv: int = 3, seed: int = 0, **kw) -> str:
        base = tiny_dir(family, **kw)
        name = f"{family}-g{group}-c{conv}-s{seed}" + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
        return str(tiny.make_tiny_linear(root / name, base, group=group, conv=conv, seed=seed))

    return make


@pytest.fixture(scope="module")
def builtin_engine():
    """The real built-in pair (about 5 GB) and the target's built-in heads, loaded once by the one module that uses it and
    freed after it, so later modules can load the pair in actors instead."""
    from cluster.engine import EngineConfig, LocalEngine

    return LocalEngine(EngineConfig("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", heads="medusa",
                                     more_heads=("amphista",)))


@pytest.fixture(scope="module")
def local_ray():
    """A private Ray instance for one module (starting Ray costs seconds): 2 CPUs and 2
    fake GPUs, so placement puts each actor on its own "device"; a small object store."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, object_store_memory=150 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any weight load during the call fails the test: validation must come first."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(actors.loading, "load", refuse)
    monkeypatch.setattr("cluster.engine.loading.load", refuse)
