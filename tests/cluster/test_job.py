"""`ray job submit -- python -m cluster.job ...` on a real local Ray head prints what `specray` prints.

One head per module (starting Ray costs seconds; see `tests/ray_head.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import ray
from ray_head import RAY, Head, ray_head

from cluster import cli

REPO = Path(__file__).parents[2]
# Pipelines whose job output must equal the local CLI's; "sync" and "async" go here when they land.
PIPELINES = ["local", "sync", "async"]
PROMPT = "hello world"


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    with ray_head(tmp_path_factory.mktemp("ray-head") / "head.log") as h:
        yield h


def submit(head: Head, args: list[str], entrypoint: list[str] | None = None,
           timeout: float = 240) -> subprocess.CompletedProcess:
    """Submit `python -m cluster.job ARGS` from the repo root with the project's runtime env.

    The runtime env is passed explicitly: Ray 2.60 would skip .venv (GBs) by itself, through
    .gitignore and its default excludes, but either can be switched off by the environment.
    """
    entrypoint = entrypoint or ["python", "-m", "cluster.job", *args]
    cmd = [
        RAY, "job", "submit", "--address", head.url, "--working-dir", str(REPO),
        "--runtime-env", str(REPO / "deploy" / "runtime_env.yaml"), "--", *entrypoint,
    ]
    r = subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"job failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def last_json_object(text: str) -> dict:
    """The program's JSON line; Ray prints its own status lines around the program output."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON object line in the job output:\n{text[-4000:]}")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_generate_job_prints_what_the_cli_prints(head, tiny_dir, capsys, pipeline):
    flags = [
        "generate", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama", noise=0.3),
        "--prompt", PROMPT, "--max-new-tokens", "12", "--pipeline", pipeline, "--json",
    ]
    remote = last_json_object(submit(head, flags).stdout)

    try:
        assert cli.main(flags) == 0  # sync/async: joins the running head, as a user's shell would
    finally:
        ray.shutdown()
    local = last_json_object(capsys.readouterr().out)

    assert remote["token_ids"] == local["token_ids"]
    assert remote["text"] == local["text"]
    assert len(remote["token_ids"]) == remote["stats"]["new_tokens"] > 0


def test_bench_job_writes_the_report(head, tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"turns": ["def f(x):", "more"]}) + "\n")
    out = tmp_path / "bench"
    submit(head, [
        "bench", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama", noise=0.3),
        "--prompts", str(prompts), "--methods", "ar,spec-local", "--limit", "2",
        "--max-new-tokens", "8", "--out", str(out),
    ])
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"ar", "spec-local"}
    assert report["methods"]["spec-local"]["identical_to_target"] is True


def test_job_computes_on_as_many_threads_as_the_cli(head):
    """Ray hands the entrypoint OMP_NUM_THREADS=1; cluster.job must not decode on one core."""
    probe = (
        "import os; from cluster.job import drop_ray_thread_cap as drop; "
        "inherited = os.environ.get('OMP_NUM_THREADS'); "
        "drop(); import torch; print('THREADS', inherited, torch.get_num_threads())"
    )
    out = submit(head, [], entrypoint=["python", "-c", probe]).stdout
    inherited, threads = next(line.split()[1:] for line in out.splitlines() if line.startswith("THREADS"))
    local = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True,
        timeout=60, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    assert inherited == "1"  # Ray's doing: if this changes, drop_ray_thread_cap may go
    assert int(threads) == int(local.stdout)


def test_without_a_cluster_the_error_says_so(monkeypatch):
    import ray

    from cluster import job

    def no_cluster(**kw):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(SystemExit, match="no running Ray cluster"):
        job.main(["generate", "--target", "x", "--prompt", "hi"])
