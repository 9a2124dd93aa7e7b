"""Every way out of an admitted request gives its admission slot back: an error raised
anywhere after admission, and a stream whose client left before its first chunk (its
generator never starts, so its own `finally` never runs). The app is driven in-process
with a real decoder on a tiny model; a leak shows as `pending` stuck above 0."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from cluster.decoder import wait_idle
from cluster.serve.app import OpenAIServer
from cluster.serve.config import ServeArgs
from cluster.serve.openai_api import APIError


@pytest.fixture(scope="module")
def server(tiny_dir):
    # the class as written, without Serve's ASGI wrapper (whose __init__ is a coroutine)
    cls = OpenAIServer.func_or_class.__mro__[1]
    srv = cls.__new__(cls)
    cls.__init__(srv, ServeArgs(target=tiny_dir("llama"), draft=tiny_dir("llama", noise=0.3), draft_dtype="float32",
                                max_len=64, max_pending=4))
    yield srv
    srv.backend.close()


def post(body: dict) -> Request:
    raw = json.dumps(body).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                    "headers": [(b"content-type", b"application/json")]}, receive)


def completion(server, **extra) -> dict:
    body = {"model": server.model, "prompt": "hello", "max_tokens": 8, "temperature": 0, **extra}
    return asyncio.run(server._serve(post(body), chat=False))


def test_an_error_after_admission_releases_the_slot(server, monkeypatch):
    expected = completion(server)["choices"][0]["text"]
    assert server.admission.pending == 0

    def broken_submit(request, on_event):
        raise RuntimeError("the decoder refused in an unexpected way")

    with monkeypatch.context() as m:
        m.setattr(server.decoder, "submit", broken_submit)
        for _ in range(server.admission.max_pending + 2):  # more than there are slots
            with pytest.raises(RuntimeError, match="unexpected way"):
                completion(server)
    assert server.admission.pending == 0
    assert completion(server)["choices"][0]["text"] == expected  # served as before


def test_an_error_while_answering_releases_the_slot_and_cancels_the_request(server, monkeypatch):
    def broken_text(token: int) -> str:
        raise KeyError(token)

    with monkeypatch.context() as m:
        m.setattr(server.backend, "token_text", broken_text)  # fails on the first token's logprobs
        with pytest.raises(KeyError):
            completion(server, logprobs=2)
    assert server.admission.pending == 0
    wait_idle(server.decoder)  # the decoder was told to stop it


def test_a_stream_never_started_is_let_go_after_its_deadline(server, monkeypatch):
    monkeypatch.setattr(server, "reclaim_grace_s", 0.2)

    async def leave_at_once() -> None:
        response = await server._serve(post({"model": server.model, "prompt": "hello", "max_tokens": 32,
                                             "stream": True, "specray": {"timeout_s": 0.3}}), chat=False)
        assert response.media_type == "text/event-stream"
        del response  # the client is gone before the first chunk: nothing iterates the stream
        assert server.admission.pending == 1
        await asyncio.sleep(1.0)

    abandoned = server.admission.abandoned
    asyncio.run(leave_at_once())
    assert server.admission.pending == 0 and server.admission.abandoned == abandoned + 1
    wait_idle(server.decoder)


def test_a_request_past_its_deadline_releases_the_slot(server):
    with pytest.raises(APIError) as err:
        completion(server, max_tokens=48, specray={"timeout_s": 0.001})
    assert err.value.status == 504 and server.admission.pending == 0
    wait_idle(server.decoder)
