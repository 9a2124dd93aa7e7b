"""A real Ray head for tests: `ray start --head --block` in its own process.

Stopping that one process stops exactly this cluster, where `ray stop` would kill every
Ray process on the machine, other people's test clusters included. Shared by the job
tests and the Serve tests.
"""

from __future__ import annotations

import contextlib
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

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


@dataclass
class Head:
    url: str  # the dashboard (job submission)
    address: str  # the GCS, for RAY_ADDRESS
    metrics_port: int  # Prometheus text from every process on the node
    env: dict[str, str]  # what a client process of this head needs


def free_ports(n: int) -> list[int]:
    """n distinct free ports: each socket stays bound until all are chosen, so the OS cannot
    hand the same port out twice (once it did, and `ray start` refused two components on one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


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
    env["RAY_metrics_report_interval_ms"] = "1000"  # metrics tests need not wait 10 s
    return env


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, token: str, timeout: float = 90.0) -> None:
    """Until the dashboard serves and the head's own node is registered: the dashboard answers
    a few seconds before the raylet has joined, and a client attaching in that window (`serve
    run` did, on a loaded CI box) fails with "No node info found matching attributes"."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url + "/api/v0/nodes", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                nodes = json.load(answer)["data"]["result"]["result"]
            if any(n.get("state") == "ALIVE" for n in nodes):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"Ray head not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """`sig` makes the process stop its own children; stragglers die by pid."""
    try:
        started = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(started, timeout=10)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


@contextlib.contextmanager
def ray_head(log: Path, num_cpus: int = 2) -> Iterator[Head]:
    # Ray's temp dir holds Unix sockets, whose paths must stay under ~107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    dashboard, gcs, client, node, objects, agent_http, agent_grpc, runtime_env, metrics = free_ports(9)
    ports = dict(
        port=gcs, dashboard_port=dashboard, ray_client_server_port=client,
        node_manager_port=node, object_manager_port=objects,
        dashboard_agent_listen_port=agent_http, dashboard_agent_grpc_port=agent_grpc,
        runtime_env_agent_port=runtime_env, metrics_export_port=metrics,
        min_worker_port=0, max_worker_port=0,  # 0: workers take ports the OS hands out
    )
    cmd = [
        RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
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
        wait_until_up(url, proc, log, env["RAY_AUTH_TOKEN"])
        yield Head(url, f"127.0.0.1:{gcs}", metrics, env)
    finally:
        stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
