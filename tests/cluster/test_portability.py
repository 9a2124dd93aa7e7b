"""Every front end on a CPU with and without native bf16, whatever CPU runs the tests.

Ways to take the other branches: `SPECRAY_NATIVE_BF16=0|1` forces the capability probe,
`ONEDNN_MAX_CPU_ISA=AVX2` makes oneDNN itself behave as on an AVX2-only CPU (no bf16 inner
product: the crash new users hit), and `SPECRAY_NATIVE_ISA=none` takes the native GGUF
kernels away (as a machine without a C compiler), so `auto` falls back to bf16 or fp32.
In every branch greedy output is the target's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray
import torch

from actors import hardware, native
from actors.pipeline_options import PipelineOptions
from cluster.engine import EngineConfig, LocalEngine
from cluster.local import DecodeConfig
from cluster.pipeline import PipelineConfig, RayPipeline

NO_KERNELS = {native.ISA_ENV: "none"}
NO_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # the real thing, probe not forced
FORCED_NATIVE = {hardware.FORCE_BF16_ENV: "1"}
BRANCHES = {  # environment -> what draft_dtype auto resolves to in each actor
    "no-native-bf16": ({**NO_NATIVE_BF16, **NO_KERNELS}, "float32"),
    "native-bf16": ({**FORCED_NATIVE, **NO_KERNELS}, "bfloat16"),
    "native-kernels": (NO_NATIVE_BF16, "Q8_0"),  # a dense draft: int8 blocks
}


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.3)


@pytest.fixture(scope="module")
def target_alone(pair):
    engine = LocalEngine(EngineConfig(pair[0]), progress=False)
    return lambda prompt, n: engine.generate(prompt, DecodeConfig(max_new_tokens=n), speculative=False).token_ids


@pytest.mark.parametrize("forced,kernels,expected", [("0", "none", "float32"), ("1", "none", "bfloat16"),
                                                     ("0", "", "Q8_0")])
def test_local_engine_resolves_auto_per_probe(pair, target_alone, monkeypatch, forced, kernels, expected):
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, forced)
    monkeypatch.setenv(native.ISA_ENV, kernels)
    if expected == "Q8_0" and not native.available():
        pytest.skip("no C compiler")
    engine = LocalEngine(EngineConfig(*pair), progress=False)  # draft_dtype defaults to auto
    assert engine.target_runner.model.dtype == torch.float32
    info = engine.runtime_info()
    assert info["draft"]["dtype"] == expected and info["target"]["dtype"] == "float32" and info["cpu"]["forced"]
    if expected == "float32":  # oneDNN's bf16 path must not be chosen where the probe says no
        assert all("onednn" not in ks for ks in info["draft"]["kernels"].values())
    for prompt in ([5, 6, 7], [9, 2]):
        for width in (1, 2):
            assert engine.generate(prompt, DecodeConfig(max_new_tokens=32, tree_width=width)).token_ids == \
                target_alone(prompt, 32)


def cli_generate(env_extra: dict, *flags: str) -> dict:
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", *flags, "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


@pytest.mark.parametrize("draft_dtype", ["auto", "bfloat16"])
def test_cli_generate_on_a_cpu_without_native_bf16(pair, draft_dtype):
    """The user's report, for real: oneDNN without bf16. `auto` picks fp32; an explicit
    bf16 draft still runs (one-line warning), never the oneDNN crash."""
    common = ["--target", pair[0], "--prompt", "def fib(n):", "--max-new-tokens", "24"]
    alone = cli_generate(NO_NATIVE_BF16, *common)
    spec = cli_generate(NO_NATIVE_BF16, *common, "--draft", pair[1], "--draft-dtype", draft_dtype)
    assert spec["token_ids"] == alone["token_ids"] and spec["stats"]["mean_accepted"] > 1
    runtime = spec["stats"]["runtime"]
    assert runtime["cpu"]["native_bf16"] is False and runtime["cpu"]["forced"] is False
    # auto: the native GGUF kernels do not need oneDNN's bf16: int8 blocks
    assert runtime["draft"]["dtype"] == ("Q8_0" if draft_dtype == "auto" else "bfloat16")
    assert ("no native bf16" in spec["stderr"]) is (draft_dtype == "bfloat16")


@pytest.fixture(scope="module", params=list(BRANCHES))
def branch_ray(request):
    """A private Ray instance whose workers see the branch's environment."""
    env, expected = BRANCHES[request.param]
    ray.init(address="local", num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": env})
    yield expected
    ray.shutdown()


def test_ray_pipelines_resolve_auto_in_each_actor(branch_ray, pair, target_alone):
    with RayPipeline(PipelineConfig(*pair, drafter_ready_s=60, request_timeout_s=120)) as pipe:
        runtime = pipe.runtime_info()
        assert runtime["draft"]["dtype"] == branch_ray and runtime["target"]["dtype"] == "float32"
        if branch_ray != "bfloat16":
            assert runtime["draft"]["capabilities"]["native_bf16"] is False
        for mode in ("sync", "async"):
            for prompt in ([5, 6, 7], [3, 14, 15, 9]):
                result = pipe.generate(prompt, DecodeConfig(max_new_tokens=32), PipelineOptions(mode=mode))
                assert result.token_ids == target_alone(prompt, 32), (mode, prompt)
                assert result.stats.verify_rounds > 0 and not result.stats.drafter_lost
