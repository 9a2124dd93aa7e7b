"""The OpenAI endpoint, end to end: a real `ray start` head, a real `serve run` of the app
on loopback, and the official `openai` client (plain HTTP where the client would refuse
to send the broken request).

Two applications on one `serve run`, tiny models:
- `/`: the async Ray pipeline (verifier + drafter actors), room for 40 pending requests,
  with oneDNN capped at AVX2 (`ONEDNN_MAX_CPU_ISA`): a CPU without native bf16, for real;
- `/small`: the local pipeline in the replica, room for 1 (full-queue and disconnect tests),
  with the capability probe forced to "native bf16" (`SPECRAY_NATIVE_BF16=1`) and no native
  GGUF kernels (`SPECRAY_NATIVE_ISA=none`);
- `/ens`: the two tiny models as one weighted ensemble (CoS), one actor per member;
- `/heads`: the target with Amphista heads (`heads:` instead of `draft:`), the heads in their
  own actor (sync pipeline);
- `/self`: the target drafting for itself with sparse attention (`draft: self`, local);
- `/tidal`: the target alone attending sparsely (`attention: tidal:8`: approximate), max_len 160.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterator

import openai
import pytest
import requests
import yaml
from ray_head import VENV_BIN, Head, free_port, ray_head, stop

from cluster.engine import EngineConfig, LocalEngine
from cluster.local import DecodeConfig
from decoding.sampling import SamplingParams

import tiny

REPO = Path(__file__).parents[2]
MODEL = "tiny"
ENSEMBLE = "tiny-ensemble"


class Server:
    def __init__(self, base: str, head: Head, target: str, config: dict):
        self.base, self.head, self.target, self.config = base, head, target, config
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        self.small = openai.OpenAI(base_url=f"{base}/small/v1", api_key="unused", max_retries=0, timeout=120)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=300)


def wait_healthy(urls: list[str], proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(pending[0], timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except requests.RequestException:
            pass
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"{pending} not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    target, draft = tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.3)
    port = free_port()
    common = {"target": target, "draft": draft, "served_model_name": MODEL}
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": "main", "route_prefix": "/", "import_path": "cluster.serve.app:build",
             "runtime_env": {"env_vars": {"ONEDNN_MAX_CPU_ISA": "AVX2"}},
             "args": {**common, "pipeline": "async", "max_pending": 40}},
            {"name": "small", "route_prefix": "/small", "import_path": "cluster.serve.app:build",
             "runtime_env": {"env_vars": {"SPECRAY_NATIVE_BF16": "1", "SPECRAY_NATIVE_ISA": "none"}},
             "args": {**common, "pipeline": "local", "max_pending": 1, "draft_length": 3,
                      "max_reading": 2, "body_timeout_s": 3}},
            {"name": "ens", "route_prefix": "/ens", "import_path": "cluster.serve.app:build",
             "args": {"ensemble": [target, draft], "combine": "we:0.5", "pipeline": "sync",
                      "served_model_name": ENSEMBLE, "max_pending": 8}},
            {"name": "heads", "route_prefix": "/heads", "import_path": "cluster.serve.app:build",
             "args": {"target": target, "heads": str(tiny.make_tiny_heads(tmp / "heads", target, scale=0.3,
                                                                        kind="amphista")),
                      "served_model_name": MODEL, "max_pending": 4}},
            {"name": "self", "route_prefix": "/self", "import_path": "cluster.serve.app:build",
             "args": {"target": target, "draft": "self", "draft_attention": "tidal:8", "pipeline": "local",
                      # a fixed k: the test asserts it drafted, whatever this machine's costs say
                      "draft_length": 4, "served_model_name": MODEL, "max_pending": 4}},
            {"name": "tidal", "route_prefix": "/tidal", "import_path": "cluster.serve.app:build",
             "args": {"target": target, "draft": None, "attention": "tidal:8", "pipeline": "local",
                      "served_model_name": MODEL, "max_pending": 4, "max_len": 160}},
        ],
    }
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    with ray_head(tmp / "head.log", num_cpus=8) as head:
        log = tmp / "serve.log"
        env = {**head.env, "RAY_ADDRESS": head.address}
        with log.open("w") as out:
            proc = subprocess.Popen([str(VENV_BIN / "serve"), "run", str(tmp / "serve.yaml")], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy([f"{base}/{app}health" for app in ("", "small/", "ens/", "heads/", "self/", "tidal/")],
                         proc, log)
            yield Server(base, head, target, config)
        finally:
            stop(proc, signal.SIGINT)  # serve run tears its applications down on Ctrl-C


@pytest.fixture(scope="module")
def target_alone(server):
    """Greedy text of the target alone, in this process: what every answer must equal."""
    engine = LocalEngine(EngineConfig(server.target), progress=False)

    def text(prompt_ids: list[int], max_tokens: int) -> str:
        result = engine.generate(prompt_ids, DecodeConfig(max_new_tokens=max_tokens), speculative=False)
        return engine.decode(result.token_ids)

    text.engine = engine
    return text


# ---- routes --------------------------------------------------------------------------

def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert server.client.models.retrieve(MODEL).id == MODEL
    health = requests.get(f"{server.base}/health", timeout=10).json()
    assert health["status"] == "ok" and health["max_pending"] == 40


def test_each_app_resolves_the_draft_dtype_on_its_own_hardware(server):
    """`draft_dtype: auto` (the default) resolves where each model runs: int8 blocks on the
    native kernels where they build (the main app: target batched in the replica, draft in
    its own actor; oneDNN capped at AVX2 but the kernels are ours), bf16 where the probe says
    native and there are no native kernels (small)."""
    main = requests.get(f"{server.base}/health", timeout=10).json()["runtime"]
    assert main["draft"]["dtype"] == "Q8_0" and main["target"]["dtype"] == "float32"
    assert main["draft"]["where"].startswith("own actor") and "batching" in main
    for role in ("target", "draft"):
        # an actor reports its own probe; a model in the replica shares the replica's (`cpu`)
        caps = main[role].get("capabilities", main["cpu"])
        assert caps["native_bf16"] is False and caps["forced"] is False  # the real probe said no
        assert main[role]["kernels"]
    small = small_health(server)["runtime"]
    assert small["draft"]["dtype"] == "bfloat16" and small["target"]["dtype"] == "float32"
    assert small["cpu"]["forced"] is True


def test_local_pipeline_app_is_the_target_alone(server, target_alone):
    ids = target_alone.engine.encode("hello world")
    out = server.small.completions.create(model=MODEL, prompt="hello world", max_tokens=24, temperature=0)
    assert out.choices[0].text == target_alone(ids, 24)
    assert out.model_extra["specray"]["drafted_tokens"] > 0


def test_completion_is_the_target_alone(server, target_alone):
    prompt = "hello world"
    ids = target_alone.engine.encode(prompt)
    expected = target_alone(ids, 24)
    full = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    streamed = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True)
    chunks = [c.choices[0].text for c in streamed]
    plain = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                             extra_body={"specray": {"speculative": False}})
    assert full.choices[0].text == "".join(chunks) == plain.choices[0].text == expected
    assert len(chunks) > 2  # it really streamed
    assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == 24
    assert full.choices[0].finish_reason == "length"
    ext = full.model_extra["specray"]
    assert ext["new_tokens"] == 24 and ext["mean_accepted"] >= 1 and ext["tokens_per_s"] > 0
    assert ext["drafted_tokens"] > 0 and plain.model_extra["specray"]["drafted_tokens"] == 0


def test_chat_streaming_and_not(server, target_alone):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count: 1 2 3"}]
    ids = target_alone.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    full = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    events = list(stream)
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert events[0].choices[0].delta.role == "assistant"
    assert full.choices[0].message.content == text == target_alone(ids, 20)
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == full.choices[0].finish_reason
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.prompt_tokens == len(ids)


def test_sampling_parameters_reach_the_decoder(server, target_alone):
    """temperature, top_p and seed each change the answer the way the target alone would."""
    engine = target_alone.engine
    ids = engine.encode("abc")
    plain = {"specray": {"speculative": False}}  # the target alone: `seed` makes it reproducible

    def served(**kw) -> str:
        return server.client.completions.create(model=MODEL, prompt="abc", max_tokens=16, extra_body=plain,
                                                **kw).choices[0].text

    def local(temperature: float, top_p: float, seed: int) -> str:
        cfg = DecodeConfig(max_new_tokens=16, sampling=SamplingParams(temperature=temperature, top_p=top_p),
                           seed=seed)
        return engine.decode(engine.generate(ids, cfg, speculative=False).token_ids)

    for seed in (7, 8):  # same seed, same sample as in this process; another seed, its own sample
        assert served(temperature=1.5, top_p=0.9, seed=seed) == local(1.5, 0.9, seed)
    samples = {served(temperature=1.5, seed=s) for s in range(4)}
    assert samples == {local(1.5, 1.0, s) for s in range(4)} and len(samples) > 1
    # a nucleus this small keeps only the top token: top_p makes T = 1.5 greedy
    assert served(temperature=1.5, top_p=1e-6, seed=3) == target_alone(ids, 16)


def test_a_heads_endpoint_serves_the_targets_output(server, target_alone):
    client = openai.OpenAI(base_url=f"{server.base}/heads/v1", api_key="unused", max_retries=0, timeout=120)
    ids = target_alone.engine.encode("def f(x):")
    answer = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=24, temperature=0)
    assert answer.choices[0].text == target_alone(ids, 24)
    health = requests.get(f"{server.base}/heads/health", timeout=10).json()
    # heads run batched in the replica by default (pipeline local)
    assert health["runtime"]["heads"]["kind"] == "amphista" and "batching" in health["runtime"]


LONG = "the quick brown fox jumps over the lazy dog. " * 3  # ~130 tokens: past the tidal budget of 8


def test_a_self_drafting_endpoint_serves_the_targets_output_and_says_how(server, target_alone):
    client = openai.OpenAI(base_url=f"{server.base}/self/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.completions.create(model=MODEL, prompt=LONG, max_tokens=24, temperature=0)
    assert answer.choices[0].text == target_alone(target_alone.engine.encode(LONG), 24)
    ext = answer.model_extra["specray"]
    assert ext["draft_attention"] == "self tidal:8" and ext["approximate"] is False and ext["drafted_tokens"] > 0


def test_a_sparse_target_endpoint_is_marked_approximate_and_keeps_max_len(server):
    client = openai.OpenAI(base_url=f"{server.base}/tidal/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.completions.create(model=MODEL, prompt=LONG, max_tokens=8, temperature=0)
    assert answer.model_extra["specray"]["approximate"] is True
    assert answer.model_extra["specray"]["attention"] == "tidal:8"
    with pytest.raises(openai.BadRequestError, match="max_len is 160"):
        client.completions.create(model=MODEL, prompt=LONG, max_tokens=64, temperature=0)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0).choices[0].text is not None


def test_stop_strings_cut_the_text(server):
    free = server.client.completions.create(model=MODEL, prompt="hello world", max_tokens=24, temperature=0)
    text = free.choices[0].text
    stop = text[5:7]  # somewhere inside the answer
    cut = text[: text.index(stop)]
    for stream in (False, True):
        out = server.client.completions.create(model=MODEL, prompt="hello world", max_tokens=24, temperature=0,
                                               stop=[stop], stream=stream)
        if stream:
            events = list(out)
            assert "".join(e.choices[0].text for e in events) == cut
            assert events[-1].choices[0].finish_reason == "stop"
        else:
            assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"


def test_an_ensemble_endpoint_serves_the_ensembles_output(server):
    from cluster.ensemble import EnsembleConfig, LocalEnsemble

    cfg = server.config["applications"][2]["args"]
    ens = LocalEnsemble(EnsembleConfig(tuple(cfg["ensemble"]), cfg["combine"]), progress=False)
    client = openai.OpenAI(base_url=f"{server.base}/ens/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [ENSEMBLE]
    ids = ens.tokenizer("hello world")["input_ids"]
    expected = ens.decode(ens.generate(ids, DecodeConfig(max_new_tokens=20), method="ensemble").token_ids)
    ask = dict(model=ENSEMBLE, prompt="hello world", max_tokens=20, temperature=0)
    cos = client.completions.create(**ask)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True))
    every_token = client.completions.create(**ask, extra_body={"specray": {"speculative": False}})
    assert cos.choices[0].text == streamed == every_token.choices[0].text == expected
    stop = expected[4:6]
    cut = client.completions.create(**ask, stop=[stop])
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"


# ---- many at once --------------------------------------------------------------------

def test_32_concurrent_requests_half_streaming_match_each_alone(server):
    requests_ = [(f"prompt {i}: " + "abcdefgh"[i % 8] * (1 + i % 5), 8 + i % 9, i % 2 == 1) for i in range(32)]

    async def one(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, stream: bool) -> str:
        if not stream:
            r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
            return r.choices[0].text
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True)
        return "".join([c.choices[0].text async for c in r])

    async def alone() -> list[str]:
        async with server.aclient() as client:
            return [await one(client, *r) for r in requests_]

    async def together() -> list[str]:
        async with server.aclient() as client:
            return await asyncio.gather(*(one(client, *r) for r in requests_))

    expected = asyncio.run(alone())
    assert asyncio.run(together()) == expected
    assert len(set(expected)) > 8  # distinct requests, not one answer 32 times


# ---- bad input -----------------------------------------------------------------------

def post(server: Server, path: str, body: str | dict) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{server.base}{path}", data=data, headers={"content-type": "application/json"},
                         timeout=60)


BAD = [
    ("/v1/chat/completions", {"model": MODEL, "max_tokens": 4}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 4}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 600, "max_tokens": 4}, 400, "context length"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 511}, 400, "context length"),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi", "max_tokens": 4}, 404, "gpt-4o"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi",', 400, "JSON"),
    ("/v1/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999], "max_tokens": 2}, 400, "token ids"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": -5}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stop": ["x" * 513]}, 400, "stop"),
    ("/v1/completions", '{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "deeply"),
]


@pytest.mark.parametrize("path,body,status,mentions", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_the_next_request_works(server, path, body, status, mentions):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert mentions.lower() in error["message"].lower()
    ok = server.client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                ("DELETE", "/v1/models", 405)])
def test_routes_that_do_not_exist_answer_in_openais_shape(server, method, path, status):
    r = requests.request(method, server.base + path, timeout=30)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_client_raises_its_own_error_types(server):
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="missing", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)


# ---- a full queue, a vanished client --------------------------------------------------

def small_health(server: Server) -> dict:
    return requests.get(f"{server.base}/small/health", timeout=10).json()


def test_full_queue_answers_503_and_a_vanished_client_frees_its_slot(server):
    abandoned = small_health(server)["abandoned"]
    body = {"model": MODEL, "prompt": "a", "max_tokens": 480, "temperature": 0, "stream": True}
    with requests.post(f"{server.base}/small/v1/completions", json=body, stream=True, timeout=60) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")  # it is decoding
        refused = post(server, "/small/v1/completions", {"model": MODEL, "prompt": "b", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        # The client walks away mid-stream.
    deadline = time.monotonic() + 30
    while small_health(server)["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = small_health(server)
    assert health["pending"] == 0
    assert health["abandoned"] == abandoned + 1  # stopped because the client left, not run to the end
    ok = server.small.completions.create(model=MODEL, prompt="b", max_tokens=2, temperature=0)  # greedy: no EOS drawn
    assert ok.usage.completion_tokens == 2


def test_slow_uploads_are_bounded_and_health_answers_throughout(server):
    """More clients trickling request bodies than the replica has places (/small: 1 pending,
    2 bodies at a time, 3 s per body, 19 places in all): the first two are cut at 3 s (408),
    the rest refused at once (503); /health answers within a second all along."""
    port = int(server.base.rsplit(":", 1)[1])
    head = (b"POST /small/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400\r\n\r\n{\"model\": ")
    slow = []
    for _ in range(24):
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
        s.sendall(head)
        slow.append(s)
    worst, began = 0.0, time.monotonic()
    while time.monotonic() - began < 5:
        start = time.monotonic()
        assert requests.get(f"{server.base}/small/health", timeout=10).status_code == 200
        worst = max(worst, time.monotonic() - start)
        for s in slow:
            with contextlib.suppress(OSError):  # an answered client's socket may be closed
                s.sendall(b" ")
        time.sleep(0.25)
    statuses = []
    for s in slow:
        with s:
            statuses.append(int(s.recv(4096).split(b" ", 2)[1]))
    assert worst < 1.0
    assert statuses.count(408) == 2 and statuses.count(503) == 22, statuses
    ok = server.small.completions.create(model=MODEL, prompt="b", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_is_cancelled_and_answered_504(server, stream):
    """`specray.timeout_s` (capped by the server's request_timeout_s): 480 tokens cannot be
    decoded in 10 ms, so the request is cancelled, its slot freed, and the client told why."""
    body = {"model": MODEL, "prompt": "a", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": stream, "specray": {"timeout_s": 0.01}}
    r = post(server, "/v1/completions", body)
    if stream:
        assert r.status_code == 200  # the headers went first: the error comes in-band
        error = json.loads(next(line for line in r.text.splitlines() if '"error"' in line).removeprefix("data: "))
        error = error["error"]
    else:
        assert r.status_code == 504, r.text
        error = r.json()["error"]
    assert error["code"] == "request_timeout" and "deadline" in error["message"]
    deadline = time.monotonic() + 30
    while requests.get(f"{server.base}/health", timeout=10).json()["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert requests.get(f"{server.base}/health", timeout=10).json()["pending"] == 0
    ok = server.client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3


# ---- metrics ---------------------------------------------------------------------------

def scrape(head: Head) -> dict[str, float]:
    """Sum of each specray series over its labels, from the node's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_specray_"):
            name = line.split("{")[0].split(" ")[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_prometheus_metrics_count_requests_and_tokens(server):
    server.client.completions.create(model=MODEL, prompt="metrics", max_tokens=12, temperature=0)
    wanted = {"ray_specray_requests_total", "ray_specray_generated_tokens_total", "ray_specray_draft_tokens_total",
              "ray_specray_accepted_tokens_total", "ray_specray_mean_accepted_length_count",
              "ray_specray_time_to_first_token_seconds_count", "ray_specray_time_per_output_token_seconds_count"}
    deadline = time.monotonic() + 60
    while not wanted <= set(totals := scrape(server.head)) and time.monotonic() < deadline:
        time.sleep(1)
    assert wanted <= set(totals), sorted(totals)
    assert totals["ray_specray_generated_tokens_total"] >= 12
    assert totals["ray_specray_requests_total"] >= 1
    assert totals["ray_specray_time_to_first_token_seconds_count"] >= 1



# ---- last: `serve deploy` onto the running cluster -------------------------------------

def test_serve_deploy_updates_the_running_application(server, tmp_path):
    """`serve deploy` (what a user runs against `ray up`'s cluster) applies a changed
    config in place: the small app comes back with room for 3, and answers."""
    config = json.loads(json.dumps(server.config))
    config["applications"][1]["args"]["max_pending"] = 3
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    r = subprocess.run([str(VENV_BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", server.head.url],
                       env=server.head.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if small_health(server)["max_pending"] == 3:
                break
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(1)
    assert small_health(server)["max_pending"] == 3
    assert server.small.completions.create(model=MODEL, prompt="b", max_tokens=2).usage.completion_tokens == 2
    assert server.client.completions.create(model=MODEL, prompt="b", max_tokens=2).usage.completion_tokens == 2


# ---- fuzzing ---------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("SPECRAY_FUZZ_EXAMPLES", "60"))  # per route and mode (BENCHMARKS: 2,000+ in all)
HOSTILE = [  # by hand: what a schema does not describe
    ("POST", "/v1/completions", b""),
    ("POST", "/v1/completions", b"\xff\xfe not utf-8"),
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": [2**62, -1]}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2**63}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "temperature": 1e308}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop": ["a" * 513]}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "seed": 2**70}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "tool"}]}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}).encode()),
    ("GET", "/v1/completions", b""),
    ("DELETE", "/v1/models/tiny", b""),
    ("POST", "/v1/models/%00", b"{}"),
]


def openai_shaped(response: requests.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error) and bool(error["message"])


def test_schema_driven_fuzzing_causes_no_server_error_and_leaks_nothing(server):
    """schemathesis draws request bodies from the endpoint's own OpenAPI document, valid ones
    (with the served model's name, so they decode) and ones that break it, plus hostile cases
    by hand: no answer is a 5xx the request caused, every error is in OpenAI's shape, and
    afterwards no admission or KV slot is held and a request gets the same answer as before."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    base = f"{server.base}/small"
    before = server.small.completions.create(model=MODEL, prompt="b", max_tokens=8, temperature=0).choices[0].text
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    session, tried, failures = requests.Session(), Counter(), []

    def record(label: str, response: requests.Response, body=None) -> None:
        tried[response.status_code // 100] += 1
        # a deadline the request set itself (specray.timeout_s) may pass: 504, as asked
        own_deadline = (response.status_code == 504 and isinstance(body, dict)
                        and isinstance(body.get("specray"), dict) and body["specray"].get("timeout_s"))
        if (response.status_code >= 500 and not own_deadline) or (response.status_code >= 400
                                                                   and not openai_shaped(response)):
            failures.append((label, response.status_code, response.text[:300]))

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(op.as_strategy(mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def one(case):
                if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = MODEL  # past the name check: into parsing, admission and decoding
                record(f"{op.label} {mode.value} {str(case.body)[:300]}",
                       case.call(base_url=base, session=session, timeout=120), case.body)

            with contextlib.suppress(Unsatisfiable):  # e.g. GET /health: nothing to break
                one()
    for method, path, raw in HOSTILE:
        record(f"{method} {path} {raw[:80]!r}", session.request(method, base + path, data=raw, timeout=120,
                                                              headers={"Content-Type": "application/json"}))
    assert not failures, failures[:10]
    assert sum(tried.values()) >= 4 * FUZZ_EXAMPLES and tried[2] > 0 and tried[4] > 0, tried
    health = small_health(server)
    assert health["pending"] == 0, health  # no admission slot held
    decoder = health["decoder"]
    assert decoder["running"] == decoder["prefilling"] == decoder["waiting"] == decoder["kv_reserved"] == 0, decoder
    again = server.small.completions.create(model=MODEL, prompt="b", max_tokens=8, temperature=0).choices[0].text
    assert again == before
    print(f"fuzzing: {sum(tried.values())} requests, by status class {dict(tried)}, 0 server errors")
