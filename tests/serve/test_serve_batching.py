"""The endpoint at load, end to end: a real `ray start` head, `serve run` of a batching
replica (tiny models, `pipeline: local`, 3 sequences at once, an API key from the
environment) and the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest
import requests
import yaml
from ray_head import VENV_BIN, free_port, ray_head, stop
from test_serve_app import MODEL, wait_healthy

REPO = Path(__file__).parents[2]
KEY = "sk-test-specray"


class Endpoint:
    def __init__(self, base: str):
        self.base = base
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0, timeout=300)

    def post(self, path: str, body: str | dict, key: str | None = KEY) -> requests.Response:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        data = body if isinstance(body, str) else json.dumps(body)
        return requests.post(f"{self.base}{path}", data=data, headers=headers, timeout=60)

    def health(self) -> dict:
        return requests.get(f"{self.base}/health", timeout=10).json()


@pytest.fixture(scope="module")
def endpoint(tiny_dir, tmp_path_factory) -> Iterator[Endpoint]:
    tmp = tmp_path_factory.mktemp("serve_batch")
    port = free_port()
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "batch", "route_prefix": "/", "import_path": "cluster.serve.app:build",
            "runtime_env": {"env_vars": {"SPECRAY_TEST_KEY": KEY}},
            "args": {"target": tiny_dir("qwen2"), "draft": tiny_dir("qwen2", noise=0.3), "pipeline": "local",
                     "served_model_name": MODEL, "max_batch": 3, "max_pending": 10, "max_len": 200,
                     "api_key_env": "SPECRAY_TEST_KEY", "max_body_bytes": 4096, "max_messages": 3, "max_stop": 2,
                     "draft_length": 2},
        }],
    }
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    with ray_head(tmp / "head.log", num_cpus=4) as head:
        log = tmp / "serve.log"
        with log.open("w") as out:
            proc = subprocess.Popen([str(VENV_BIN / "serve"), "run", str(tmp / "serve.yaml")], cwd=REPO,
                                    env={**head.env, "RAY_ADDRESS": head.address}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy([f"{base}/health"], proc, log)
            yield Endpoint(base)
        finally:
            stop(proc, signal.SIGINT)


def test_api_key_is_required_and_the_openai_clients_key_works(endpoint):
    for key in (None, "sk-wrong"):
        r = endpoint.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}, key=key)
        assert r.status_code == 401, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{endpoint.base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert [m.id for m in endpoint.client.models.list().data] == [MODEL]
    # ignore_eos: a sampled tiny model may end on its EOS token within 3 tokens (a few % of runs)
    done = endpoint.client.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 3
    # vLLM's ignore_eos (load generators send it): exactly max_tokens
    long = endpoint.client.completions.create(model=MODEL, prompt="hi", max_tokens=40, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 40
    for page in ("/openapi.json", "/docs"):  # the API's description follows the API's rule
        assert requests.get(f"{endpoint.base}{page}", timeout=30).status_code == 401
        assert requests.get(f"{endpoint.base}{page}", headers={"authorization": f"Bearer {KEY}"},
                            timeout=30).status_code == 200
    described = requests.get(f"{endpoint.base}/openapi.json", headers={"authorization": f"Bearer {KEY}"},
                             timeout=30).json()
    body = described["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert "messages" in body["schema"]["required"]
    health = endpoint.health()  # no key needed: load balancers probe it
    assert health["status"] == "ok" and health["decoder"]["batching"] is True
    assert health["decoder"]["max_seqs"] == 3


LIMITS = [
    ({"model": MODEL, "prompt": "x" * 5000, "max_tokens": 2}, 413, "4096 bytes"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 4, "max_tokens": 2}, 400, "at most 3"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 2, "stop": ["a", "b", "c"]}, 400, "at most 2"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 2, "seed": -1}, 400, "seed"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 2, "seed": 2**64}, 400, "seed"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 199}, 400, "max_len is 200"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
]


@pytest.mark.parametrize("body,status,mentions", LIMITS, ids=[f"{s}-{i}" for i, (_, s, _) in enumerate(LIMITS)])
def test_limits_answer_with_the_limit_named_and_the_next_request_works(endpoint, body, status, mentions):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = endpoint.post(path, body)
    assert r.status_code == status, r.text
    assert mentions.lower() in r.json()["error"]["message"].lower()
    assert endpoint.client.completions.create(model=MODEL, prompt="ok", max_tokens=2,
                                              extra_body={"ignore_eos": True}).usage.completion_tokens == 2


async def one(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, stream: bool, stop: list[str] | None,
              cancel_after: int | None = None) -> tuple[str, str | None]:
    ask = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stop=stop)
    if not stream:
        r = await client.completions.create(**ask)
        return r.choices[0].text, r.choices[0].finish_reason
    extra = {"extra_body": {"ignore_eos": True}} if cancel_after is not None else {}
    r = await client.completions.create(**ask, stream=True, **extra)
    text, finish, chunks = "", None, 0
    async for c in r:
        text += c.choices[0].text
        finish = c.choices[0].finish_reason or finish
        chunks += 1
        if cancel_after is not None and chunks >= cancel_after:
            await r.close()  # the client walks away mid-stream
            return text, "gone"
    return text, finish


def test_mixed_concurrent_requests_each_equal_to_the_request_alone(endpoint):
    """Streaming and not, stop strings, different lengths, two clients leaving early: each
    answer is the one the same request gets alone; the batch frees every slot."""
    reqs = [(f"req {i}: " + "xyzw"[i % 4] * (1 + 3 * (i % 5)), 4 + (7 * i) % 40, i % 2 == 0,
             None, None) for i in range(10)]
    alone = [asyncio.run(_alone(endpoint, r)) for r in reqs]
    for i in (3, 8):  # stop strings taken from inside their own answers
        text = alone[i][0]
        if len(text) > 6:
            reqs[i] = (*reqs[i][:3], [text[4:6]], None)
    # These two clients leave after 2 chunks of a long answer (ignore_eos): one that finished
    # before its client left would not be abandoned (on a busy box that happened at 27 tokens).
    reqs[5] = (reqs[5][0], 150, True, None, 2)
    reqs[9] = (reqs[9][0], 150, True, None, 2)
    alone = [asyncio.run(_alone(endpoint, r)) for r in reqs]

    async def together():
        async with endpoint.aclient() as client:
            return await asyncio.gather(*(one(client, *r) for r in reqs))

    got = asyncio.run(together())
    for r, a, g in zip(reqs, alone, got):
        if r[4] is not None:
            assert a[0].startswith(g[0]) and g[1] == "gone"
        else:
            assert g == a, r
    deadline = time.monotonic() + 30
    while ((h := endpoint.health())["pending"] or h["abandoned"] < 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert h["pending"] == 0 and h["decoder"]["running"] == 0 and h["decoder"]["kv_reserved"] == 0
    assert h["abandoned"] >= 2


async def _alone(endpoint: Endpoint, r) -> tuple[str, str | None]:
    async with endpoint.aclient() as client:
        return await one(client, *r)


def test_past_capacity_requests_wait_then_get_503_while_health_answers(endpoint):
    body = {"model": MODEL, "prompt": "long", "max_tokens": 150, "temperature": 0}

    async def flood():
        async with endpoint.aclient() as client:
            async def ask():
                try:
                    r = await client.completions.create(**body)
                    return r.usage.completion_tokens
                except openai.APIStatusError as exc:
                    return exc
            return await asyncio.gather(*(ask() for _ in range(16)))

    async def probe_during():
        task = asyncio.create_task(flood())
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        health = await asyncio.to_thread(endpoint.health)
        models = await asyncio.to_thread(endpoint.client.models.list)
        return await task, health, models, time.monotonic() - t0

    results, health, models, probe_s = asyncio.run(probe_during())
    refused = [r for r in results if isinstance(r, Exception)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(served) >= 10 and all(n == 150 for n in served)  # 3 decoding + 7 waiting, all finished
    assert refused and all(r.status_code == 503 for r in refused)
    assert all(int(r.response.headers["Retry-After"]) >= 1 for r in refused)
    assert health["status"] == "ok" and [m.id for m in models.data] == [MODEL]
    assert endpoint.client.completions.create(model=MODEL, prompt="ok", max_tokens=2,
                                              extra_body={"ignore_eos": True}).usage.completion_tokens == 2


def test_logprobs_are_the_targets_with_and_without_speculation(endpoint):
    messages = [{"role": "user", "content": "count"}]
    ask = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    spec = endpoint.client.chat.completions.create(**ask)
    plain = endpoint.client.chat.completions.create(**ask, extra_body={"specray": {"speculative": False}})
    a, b = spec.choices[0].logprobs.content, plain.choices[0].logprobs.content
    assert len(a) == len(b) == 12
    assert [x.token for x in a] == [x.token for x in b]
    assert all(abs(x.logprob - y.logprob) < 1e-4 and len(x.top_logprobs) == 2 for x, y in zip(a, b))
    assert all(x.top_logprobs[0].logprob >= x.logprob - 1e-6 for x in a)  # greedy picks the top
    assert spec.model_extra["specray"]["drafted_tokens"] > 0
    comp = endpoint.client.completions.create(model=MODEL, prompt="count", max_tokens=6, temperature=0, logprobs=1)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == comp.choices[0].text
