"""`ray job submit -- python -m cluster.job ...` on a real local Ray head prints what `specray` prints.

One head per module (starting Ray costs seconds). It runs as `ray start --head --block`
in its own process: stopping that one process stops exactly this cluster, where
`ray stop` would kill every Ray process on the machine, other people's test clusters
included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import ray

from cluster import cli

REPO = Path(__file__).parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# Pipelines whose job output must equal the local CLI's; "sync" and "async" go here when they land.
PIPELINES = ["local", "sync", "async"]
PROMPT = "hello world"


@dataclass
class Head:
    url: str
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env() -> dict[str, str]:
    # No RAY_ADDRESS (it would point elsewhere); no OMP_NUM_THREADS, as deploy/cluster.yaml does.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    # The job's entrypoint runs `python` from the PATH that `ray start` had: make it the venv's.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    # Ray 2.60 turns token auth on for `ray start` whenever ~/.ray/auth_token exists (any
    # earlier ray.init() leaves one), but `ray job submit` does not follow suit: name the
    # mode and a fresh token for both sides, independent of what ~/.ray holds.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # an answer at all (401 without the token) means the dashboard is serving
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"Ray head not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop its own processes; stragglers die by pid."""
    try:
        started = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(started, timeout=10)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    # Ray's temp dir holds Unix sockets, whose paths must stay under ~107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    dashboard = free_port()
    ports = dict(
        port=free_port(), dashboard_port=dashboard, ray_client_server_port=free_port(),
        node_manager_port=free_port(), object_manager_port=free_port(),
        dashboard_agent_listen_port=free_port(), dashboard_agent_grpc_port=free_port(),
        runtime_env_agent_port=free_port(), metrics_export_port=free_port(),
        min_worker_port=0, max_worker_port=0,  # 0: workers take ports the OS hands out
    )
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
        "--object-store-memory=300000000",  # the default 30% of RAM is wanted by the models
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
        *(f"--{k.replace('_', '-')}={v}" for k, v in ports.items()),
    ]
    env = head_env()
    url = f"http://127.0.0.1:{dashboard}"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(url, proc, log)
        yield Head(url, env)
    finally:
        stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
        "import os; from cluster.job import drop_ray_thread_cap as drop; inherited = os.environ.get('OMP_NUM_THREADS'); "
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
