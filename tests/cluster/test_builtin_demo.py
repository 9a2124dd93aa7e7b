"""`make demo`'s two commands on the built-in pair, on a CPU without native bf16.

oneDNN, MKL and ATen are capped at AVX2 (`ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`,
`ATEN_CPU_CAPABILITY`), and so are our GGUF kernels (`SPECRAY_NATIVE_ISA`), so the probes
answer as on the Zen 3 box where the demo used to crash. Shorter than the demo (fewer
tokens, one prompt) to keep CI fast.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.builtin

REPO = Path(__file__).parents[2]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
        "SPECRAY_NATIVE_ISA": "avx2"}
PAIR = ["--target", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b", "--chat"]


def specray(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECRAY_NATIVE_BF16"} | AVX2
    specray_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "specray"
    proc = subprocess.run([str(specray_bin) if specray_bin.exists() else "specray", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_demo_commands_run_where_bf16_is_not_native(tmp_path):
    gen = specray("generate", *PAIR, "--prompt", "Write a Python function that checks whether a number is prime.",
                  "--max-new-tokens", "32", "--json")
    out = json.loads(gen.stdout.strip().splitlines()[-1])
    runtime = out["stats"]["runtime"]
    assert runtime["cpu"]["native_bf16"] is False and runtime["cpu"]["isa"] == "AVX2"
    # the default --dtype file: the target's own GGUF blocks, said in one line
    assert "--dtype file -> its GGUF file" in gen.stderr and "avx2" in gen.stderr
    assert runtime["target"]["dtype"] == "Q4_K+Q6_K"
    # auto: the draft's own GGUF blocks, on the AVX2 kernels (no bf16 needed anywhere)
    assert runtime["draft"]["dtype"] == "Q4_K+Q5_0+Q6_K+Q8_0"
    kinds = runtime["draft"]["kernels"].values()
    assert any("native avx2" in k for k in kinds) and not any("avx512" in k for k in kinds)
    assert len(out["token_ids"]) == 32 and out["stats"]["mean_accepted"] > 1

    specray("bench", *PAIR, "--prompts", "benchmarks/prompts/spec_bench_20.jsonl", "--limit", "1",
            "--max-new-tokens", "24", "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["methods"]) == ["ar", "spec-local", "spec-ngram"]  # a GGUF target's defaults
    assert all(row["identical_to_target"] for row in report["methods"].values()), report["methods"]
    assert report["config"]["runtime"]["draft"]["dtype"] == "Q4_K+Q5_0+Q6_K+Q8_0"
    assert "draft: Q4_K+Q5_0+Q6_K+Q8_0" in (tmp_path / "report.md").read_text()
