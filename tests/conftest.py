"""Shared fixtures: tiny random model pairs (cheap), and one loaded built-in pair per process."""

from __future__ import annotations

import os

import pytest

# isort: off
import actors  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

import actors.loading  # noqa: E402
import tiny  # noqa: E402
# isort: on

# Tiny models are all overhead: one thread avoids OpenMP spin-waits on a busy 2-core box.
torch.set_num_threads(1)




# `make test` runs two pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`).
# A module's tests stay on one worker (its module fixtures and Ray cluster start once). Two
# groups span modules: those on the real built-in models (their names say `builtin`), so one
# copy of the pair is loaded at a time (24 GiB holds one); and those that start a Ray cluster
# of their own, so two clusters' actors never share the 2 cores at once (once they did, an
# ensemble's actors were starved past its 120 s timeout). The longest groups start first, so
# neither worker is left alone with a long tail. Measured in BENCHMARKS.md ("Test suite").
RAY_MODULES = frozenset(f"tests/{m}.py" for m in (
    "cluster/test_bench", "cluster/test_cli_heads", "cluster/test_job", "cluster/test_placement",
    "cluster/test_portability", "cluster/test_ray_batched", "cluster/test_ray_ensemble", "cluster/test_ray_linear",
    "cluster/test_ray_long_context", "cluster/test_ray_pipeline", "serve/test_serve_app",
    "serve/test_serve_batching", "deploy/test_local_cluster",
))
SLOW_FIRST = (
    "builtin",
    "ray",
    "tests/actors/test_linear_attention.py",
    "tests/cluster/test_local.py",
    "tests/actors/test_pipelines.py",
    "tests/actors/test_cos.py",
    "tests/actors/test_tidal.py",
    "tests/training/test_train_heads.py",
    "tests/actors/test_heads.py",
    "tests/actors/test_quantized.py",
    "tests/actors/test_amphista.py",
    "tests/cluster/test_batching_drafters.py",
    "tests/cluster/test_batching.py",
)


def test_group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    if "builtin" in module.rsplit("/", 1)[-1]:
        return "builtin"
    return "ray" if module in RAY_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the groups of `test_group` as units (xdist's own `loadgroup`
    cannot be used: it rewrites node ids in a way pytest 9.2 no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return test_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("builtin") and test_group(item.nodeid) != "builtin":
            raise pytest.UsageError(f"{item.nodeid} uses the built-in models: its module's name must say "
                                    "`builtin` (tests/conftest.py keeps those on one xdist worker)")
        if "local_ray" in item.fixturenames and test_group(item.nodeid) not in ("ray", "builtin"):
            raise pytest.UsageError(f"{item.nodeid} starts a Ray cluster: add its module to RAY_MODULES "
                                    "in tests/conftest.py (one cluster at a time)")
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(test_group(item.nodeid), len(rank)))  # stable: the rest keep their order
    # `cuda` tests run where torch sees a GPU (benchmarks/gpu_check.sh), else skip.
    if not torch.cuda.is_available():
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
def builtin_threads():
    """A built-in module computes on this worker's share of the cores; the tiny-model tests
    after it run on one thread again (a module left at 2 threads made them 3x slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def builtin_engine(builtin_threads):
    """The real built-in pair (about 5 GB) and the target's built-in heads, loaded once by the one module
    that uses it and
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
