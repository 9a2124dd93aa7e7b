"""The card's used-by lines on a multi-node Ray cluster, started as users start theirs:
`deploy/local_cluster.py up` builds two nodes on this machine (network namespaces with
their own addresses, PID and mount namespaces, SSH servers) and runs `ray up
deploy/cluster-local.yaml`; then jobs and a Serve app are deployed to the head's address
from outside, as from a user's laptop.

Runs where the machine allows (root, network namespaces, openssh-server and rsync
installed: `.ci/run` installs them), else skips saying why; SPECRAY_CLUSTER_TESTS=0 skips
it. In the `ray` group of tests/conftest.py: one cluster at a time on the 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "deploy" / "local_cluster.py"
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP = "10.77.0.10", "10.77.0.11"  # deploy/cluster-local.yaml


def why_not_here() -> str | None:
    if os.environ.get("SPECRAY_CLUSTER_TESTS") == "0":
        return "switched off (SPECRAY_CLUSTER_TESTS=0)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge)"
    if missing := [t for t in ("ip", "unshare", "rsync", "ssh") if shutil.which(t) is None]:
        return f"missing {', '.join(missing)} (apt-get install iproute2 util-linux rsync openssh-client)"
    if not Path("/usr/sbin/sshd").exists():
        return "no SSH server (apt-get install openssh-server; .ci/run does)"
    if Path("/run/netns/sp-head").exists():
        return "a local cluster is up already (deploy/local_cluster.py down)"
    probe = f"sp-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces unavailable here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


WHY_NOT = why_not_here()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict]:
    """The cluster's client environment: the head's job API and the cluster's token."""
    up = subprocess.run([sys.executable, str(SCRIPT), "up"], capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, f"local_cluster up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        env = {**os.environ, "RAY_ADDRESS": f"http://{HEAD_IP}:8265", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(Path.home() / ".specray-local" / "auth_token")}
        env.pop("RAY_AUTH_TOKEN", None)
        wait_for_nodes(env, 2)
        yield env
    finally:
        teardown([sys.executable, str(SCRIPT), "down"], 300)


def teardown(cmd: list[str], timeout_s: float, env: dict | None = None) -> None:
    """Run a clean-up command; one that fails or hangs is reported, not raised: `down`
    removes whatever it left (a node killed by a test cannot answer `serve shutdown`)."""
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            print(f"clean-up {cmd[1:3]} exited {r.returncode}: {r.stderr[-1000:]}", file=sys.stderr)
    except subprocess.TimeoutExpired:
        print(f"clean-up {cmd[1:3]} still running after {timeout_s:.0f} s", file=sys.stderr)


def wait_for_nodes(env: dict, n: int, timeout_s: float = 180.0) -> list[dict]:
    """The ALIVE nodes once `n` have joined (the worker joins after `ray up` returns)."""
    import time

    deadline = time.monotonic() + timeout_s
    alive: list[dict] = []
    while time.monotonic() < deadline:
        r = subprocess.run([RAY, "list", "nodes", "--format", "json", "--detail"], env=env, capture_output=True,
                           text=True, timeout=60)
        if r.returncode == 0:
            alive = [node for node in json.loads(r.stdout) if node.get("state") == "ALIVE"]
            if len(alive) >= n:
                return alive
        time.sleep(2)
    raise AssertionError(f"{len(alive)} of {n} nodes joined in {timeout_s:.0f} s")


def submit(env: dict, args: list[str], timeout: float = 400, parse: bool = True) -> dict | str:
    """Run `cluster.job ARGS` on the cluster; its last JSON line (or, parse=False, its output)."""
    cmd = [RAY, "job", "submit", "--working-dir", str(REPO), "--runtime-env", str(REPO / "deploy" / "runtime_env.yaml"),
           "--", "python", "-m", "cluster.job", *args]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"job failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    if not parse:
        return r.stdout
    for line in reversed(r.stdout.splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the job output:\n{r.stdout[-4000:]}")


def test_ray_up_starts_a_node_per_address(cluster):
    nodes = wait_for_nodes(cluster, 2)
    assert sorted(node["node_ip"] for node in nodes) == [HEAD_IP, WORKER_IP]


def test_a_job_places_verifier_and_drafter_on_different_nodes_and_decodes_the_target(cluster, tiny_dir):
    target, draft = tiny_dir("llama"), tiny_dir("llama", noise=0.3)
    flags = ["generate", "--target", target, "--draft", draft, "--prompt", "hello world", "--max-new-tokens", "16",
             "--json"]
    remote = submit(cluster, [*flags, "--pipeline", "sync", "--spread"])
    runtime = remote["stats"]["runtime"]
    # placement by node: the ZeroMQ link between them crossed the bridge between the nodes
    assert {runtime["target"]["node_ip"], runtime["draft"]["node_ip"]} == {HEAD_IP, WORKER_IP}

    out = subprocess.run([sys.executable, "-m", "cluster.cli", *flags, "--pipeline", "local"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    local = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert remote["token_ids"] == local["token_ids"] and len(remote["token_ids"]) > 0


def test_a_bench_job_reports_where_each_actor_ran(cluster, tiny_dir):
    target, draft = tiny_dir("llama"), tiny_dir("llama", noise=0.3)
    out = submit(cluster, ["bench", "--target", target, "--draft", draft, "--prompts",
                           "benchmarks/prompts/spec_bench_coding.jsonl", "--limit", "2", "--max-new-tokens", "8",
                           "--methods", "ar,spec-sync", "--draft-dtype", "float32", "--spread", "--out", "bench-out"],
                 parse=False)
    placed = dict(re.findall(r"^- (pipeline_target|pipeline_draft): .* on node (\S+)$", out, re.M))
    assert set(placed.values()) == {HEAD_IP, WORKER_IP}, out[-3000:]  # the report says which node each ran on
    assert re.search(r"^\| spec-sync \|.*\| (yes|True) \|$", out, re.M), out[-3000:]  # identical to the target


def node_of_each_actor(env: dict) -> dict[str, set[str]]:
    """Class name -> the addresses of the nodes its live actors run on."""
    nodes = {n["node_id"]: n["node_ip"] for n in wait_for_nodes(env, 2)}
    r = subprocess.run([RAY, "list", "actors", "--format", "json", "--detail", "--filter", "state=ALIVE"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    where: dict[str, set[str]] = {}
    for actor in json.loads(r.stdout):
        where.setdefault(actor["class_name"], set()).add(nodes.get(actor["node_id"], "?"))
    return where


@pytest.fixture(scope="module")
def served(cluster, tiny_dir, tmp_path_factory) -> Iterator[dict]:
    """`serve deploy` of the shipped serve.yaml on this cluster: served to the network (so
    with a key), tiny models, two replicas (one a node) each with its draft model in an
    actor on the other node (`spread`). Each node's Serve proxy sends requests to its own
    node's replica (Serve's default), so a client picks the replica by the address it uses."""
    import yaml

    target = tiny_dir("qwen2", max_position_embeddings=4096)
    draft = tiny_dir("qwen2", noise=0.3, max_position_embeddings=4096)
    shipped = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    app = shipped["applications"][0]
    shipped["http_options"]["host"] = "0.0.0.0"
    app["args"].update(target=target, draft=draft, pipeline="sync", served_model_name="tiny", api_key="k-test",
                       dtype="float32", draft_dtype="float32", spread=True,
                       draft_length=3)  # drafts every round (the cost model may not, on 2 shared cores)
    deployment = app["deployments"][0]
    del deployment["autoscaling_config"]
    deployment.update(num_replicas=2, max_replicas_per_node=1)
    deployment["ray_actor_options"].update(num_cpus=1)  # a node's other CPU: the other replica's drafter
    config = tmp_path_factory.mktemp("serve") / "serve.yaml"
    config.write_text(yaml.safe_dump(shipped))
    serve = str(Path(sys.executable).with_name("serve"))
    r = subprocess.run([serve, "deploy", "-a", cluster["RAY_ADDRESS"], str(config)], env=cluster, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    try:
        yield {"target": target, "base": f"http://{HEAD_IP}:8000/v1", "worker_base": f"http://{WORKER_IP}:8000/v1"}
    finally:
        teardown([serve, "shutdown", "-a", cluster["RAY_ADDRESS"], "-y"], 120, env=cluster)


def runtimes(timeout_s: float = 240.0) -> dict[str, dict]:
    """Each replica's /health runtime, by the replica's node, asked through each node's proxy
    (once the replica is up)."""
    import time

    import requests

    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    for ip in (HEAD_IP, WORKER_IP):
        while (r := requests.get(f"http://{ip}:8000/health", timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, f"{ip}:8000/health answered {r.status_code}: {r.text[:300]}"
            time.sleep(2)
        seen[r.json()["runtime"]["replica"]["node_ip"]] = r.json()["runtime"]
    return seen


def target_alone(target: str, prompt: str, n: int, ignore_eos: bool = False) -> str:
    from cluster.engine import EngineConfig, LocalEngine
    from cluster.local import DecodeConfig

    engine = LocalEngine(EngineConfig(target), progress=False)
    cfg = DecodeConfig(max_new_tokens=n, eos_token_ids=(-1,) if ignore_eos else ())
    return engine.decode(engine.generate(engine.encode(prompt), cfg, speculative=False).token_ids)


def test_serve_deploy_answers_the_openai_client_from_the_other_nodes(cluster, served):
    import openai

    client = openai.OpenAI(base_url=served["base"], api_key="k-test", max_retries=0, timeout=120)
    wait_for_models(client)
    expected = target_alone(served["target"], "hello world", 16)
    full = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0, stream=True)
    assert full.choices[0].text == "".join(c.choices[0].text for c in streamed) == expected
    assert full.model_extra["specray"]["drafted_tokens"] > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["base"], api_key="wrong", max_retries=0).models.list()
    where = node_of_each_actor(cluster)
    replicas = set().union(*(ips for name, ips in where.items() if name.startswith("ServeReplica")))
    assert replicas == {HEAD_IP, WORKER_IP} and where.get("ModelActor") == {HEAD_IP, WORKER_IP}, where
    assert set(runtimes()) == {HEAD_IP, WORKER_IP}  # each proxy answers from its node's replica
    for node, runtime in runtimes().items():  # each replica's drafter: on the other node, over CURVE
        link = runtime["draft"]["link"]
        assert runtime["draft"]["node_ip"] != node and link["auth"] == "curve", runtime["draft"]
        assert link["endpoint"].startswith(f"tcp://{runtime['draft']['node_ip']}:"), link


def test_a_peer_without_the_pipelines_secret_is_refused_at_the_drafters_link(cluster, served):
    """A process on the network (this machine, outside both nodes) that connects to a
    drafter's link, with no CURVE keys or with keys of its own, never completes the
    handshake and gets no answer; the pipeline decodes on, speculating."""
    import openai
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    endpoint = runtimes()[HEAD_IP]["draft"]["link"]["endpoint"]  # on the worker
    ctx = zmq.Context()
    try:
        for keys in (None, zmq.curve_keypair()):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if keys is not None:  # CURVE, but not the pipeline's keys (it cannot know them)
                sock.curve_publickey, sock.curve_secretkey = keys
                sock.curve_serverkey = zmq.curve_keypair()[0]
            monitor = sock.get_monitor_socket()
            sock.connect(endpoint)
            sock.send_multipart([b"\x00" * 16, b"hello"])
            events = []
            while monitor.poll(3000):
                events.append(recv_monitor_message(monitor)["event"])
                if len(events) > 20:
                    break
            assert zmq.EVENT_CONNECTED in events, events  # it reached the port...
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, events  # ...and was refused there
            assert not sock.poll(1000), "the drafter answered an unauthenticated peer"
            sock.disable_monitor()
            monitor.close()
            sock.close()
    finally:
        ctx.term()
    client = openai.OpenAI(base_url=served["base"], api_key="k-test", max_retries=0, timeout=120)
    again = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0)
    assert again.choices[0].text == target_alone(served["target"], "hello world", 16)
    assert again.model_extra["specray"]["drafted_tokens"] > 0


def test_a_partition_that_heals_keeps_the_output_and_speculation_comes_back(cluster, served):
    """The worker's link down for 3 s while a request streams, then up again: the request
    ends with the target's text (nothing decoded twice, nothing lost), and the next one
    drafts again over the healed link."""
    import time

    import openai

    client = openai.OpenAI(base_url=served["base"], api_key="k-test", max_retries=0, timeout=300)
    wait_for_models(client)
    n = 1500
    expected = target_alone(served["target"], "hello world", n, ignore_eos=True)
    stream = client.completions.create(model="tiny", prompt="hello world", max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks, stats = [], {}
    try:
        for i, chunk in enumerate(stream):
            chunks.append(chunk.choices[0].text if chunk.choices else "")
            stats = (chunk.model_extra or {}).get("specray") or stats
            if i == 20:
                subprocess.run(["ip", "link", "set", "v-sp-w1", "down"], check=True)
                cut_at = time.monotonic()
            if i == 21:
                time.sleep(max(0.0, 3.0 - (time.monotonic() - cut_at)))
                subprocess.run(["ip", "link", "set", "v-sp-w1", "up"], check=True)
    finally:
        subprocess.run(["ip", "link", "set", "v-sp-w1", "up"], check=False)
    assert "".join(chunks) == expected
    assert stats["new_tokens"] == n, stats
    deadline = time.monotonic() + 60
    while True:  # a drafter again (the same one over the healed link, or a new one)
        again = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0)
        assert again.choices[0].text == target_alone(served["target"], "hello world", 16)
        if again.model_extra["specray"]["drafted_tokens"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert again.model_extra["specray"]["drafted_tokens"] > 0, again.model_extra


def test_a_node_dying_mid_request_keeps_the_text_and_the_endpoint_answers_on(cluster, served):
    """Every process of the worker node killed while a request streams on each replica (one
    through each node's address): the head's completes target-only with the target's text
    (its drafter was on the worker: lost); the worker's ends in an error at once, not a
    hang; the head's address answers on, from its own replica, target-only (no node left
    for a drafter)."""
    import threading
    import time

    import openai

    n = 1500
    expected = target_alone(served["target"], "hello world", n, ignore_eos=True)
    streams = [{"base": base, "chunks": [], "stats": {}, "error": None, "ended": None, "going": threading.Event()}
               for base in (served["base"], served["worker_base"])]

    def read(stream: dict) -> None:
        client = openai.OpenAI(base_url=stream["base"], api_key="k-test", max_retries=0, timeout=120)
        try:
            wait_for_models(client)
            for chunk in client.completions.create(model="tiny", prompt="hello world", max_tokens=n, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                stream["chunks"].append(chunk.choices[0].text if chunk.choices else "")
                stream["stats"] = (chunk.model_extra or {}).get("specray") or stream["stats"]
                if len(stream["chunks"]) == 20:
                    stream["going"].set()
        except Exception as e:  # the replica's node died under it: what its client saw
            stream["error"] = e
        finally:
            stream["ended"] = time.monotonic()
            stream["going"].set()

    threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    assert all(s["going"].wait(240) for s in streams)
    assert not any(s["error"] for s in streams), [repr(s["error"]) for s in streams]
    kill_node("sp-w1")
    killed = time.monotonic()
    for t in threads:
        t.join(240)
    head, worker = streams
    assert head["error"] is None and "".join(head["chunks"]) == expected
    assert head["stats"]["drafter_lost"] and head["stats"]["drafted_tokens"] > 0, head["stats"]
    assert worker["error"] is not None and not isinstance(worker["error"], openai.APITimeoutError), worker["stats"]
    assert worker["ended"] - killed < 30, f"the worker's client waited {worker['ended'] - killed:.0f} s"
    client = openai.OpenAI(base_url=served["base"], api_key="k-test", max_retries=0, timeout=60)
    short = target_alone(served["target"], "hello world", 16)
    for _ in range(3):
        again = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0)
        assert again.choices[0].text == short


def kill_node(netns: str) -> None:
    """SIGKILL every process of a node (listed by its network namespace), as a power cut
    would end them; one that exits between the listing and the kill is already gone."""
    import signal

    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    assert pids, f"no processes in {netns}"
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_models(client, timeout_s: float = 240.0) -> None:
    import time

    import openai

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.models.list()
            return
        except (openai.APIConnectionError, openai.APIStatusError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
