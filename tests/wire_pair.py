"""A verifier in this thread and a drafter in another, joined by real ZeroMQ ipc sockets:
the sync and async pipelines and draft heads over the wire, without Ray.

`generate` gives each request a drafter thread of its own, as a drafter that can die
mid-request needs. `generate_many` keeps one drafter thread and one socket for many
requests in turn: the sampling tests decode thousands of requests, and each should pay
for its messages, not for a thread, a socket and a connection of its own.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from actors.pipeline_options import PipelineOptions
from actors.runner import ModelRunner
from actors.verifying import verify_request
from decoding.request import DecodeConfig, GenerationResult
from protocol import ChannelConfig, DealerChannel, ModelFingerprint, RouterChannel, ipc_endpoint, new_session_id

FINGERPRINT = ModelFingerprint(vocab_size=1, tokenizer_hash="t" * 64)
CHANNEL = ChannelConfig(tensor_lib="torch", recv_timeout_s=10, connection_heartbeat_s=None)

# One request's drafting: (dealer, session, cfg, opts, cancelled) -> the drafter's stats.
Propose = Callable[[DealerChannel, str, DecodeConfig, PipelineOptions, Callable[[], bool]], dict]


class WirePair:
    def __init__(self, target: ModelRunner, propose: Propose):
        self.target, self.propose = target, propose
        self.router = RouterChannel(ipc_endpoint(), config=CHANNEL)

    def _verify(self, session: str, prompt: list[int], cfg: DecodeConfig, opts: PipelineOptions,
                alive: Callable[[], bool]) -> GenerationResult:
        return verify_request(self.target, self.router, FINGERPRINT, session, prompt, cfg, opts, drafter_alive=alive)

    def generate(self, prompt: list[int], cfg: DecodeConfig, opts: PipelineOptions,
                 drafter_dies_after: float | None = None) -> tuple[GenerationResult, dict]:
        """One request, its drafter in a thread of its own (stopped after `drafter_dies_after` s)."""
        session, box, stop = new_session_id(), {}, threading.Event()

        def drafter():
            with DealerChannel(self.router.endpoint, config=CHANNEL) as dealer:
                try:
                    box["stats"] = self.propose(dealer, session, cfg, opts, stop.is_set)
                except BaseException as exc:  # noqa: BLE001 - reported to the test
                    box["error"] = exc

        thread = threading.Thread(target=drafter, daemon=True)
        thread.start()
        if drafter_dies_after is not None:
            threading.Timer(drafter_dies_after, stop.set).start()
        result = self._verify(session, prompt, cfg, opts, thread.is_alive)
        thread.join(10)
        assert not thread.is_alive()
        return result, box

    def generate_many(self, prompt: list[int], cfgs: list[DecodeConfig],
                      opts: PipelineOptions) -> tuple[list[GenerationResult], list[dict]]:
        """Many requests one after another, one drafter thread and socket for all of them."""
        jobs: queue.Queue = queue.Queue()
        stats: list[dict] = []
        errors: list[BaseException] = []

        def drafter():
            with DealerChannel(self.router.endpoint, config=CHANNEL) as dealer:
                for session, cfg in iter(jobs.get, None):
                    try:
                        stats.append(self.propose(dealer, session, cfg, opts, lambda: False))
                    except BaseException as exc:  # noqa: BLE001 - reported to the test
                        errors.append(exc)
                        return

        thread = threading.Thread(target=drafter, daemon=True)
        thread.start()
        results = []
        try:
            for cfg in cfgs:
                session = new_session_id()
                jobs.put((session, cfg))
                results.append(self._verify(session, prompt, cfg, opts, thread.is_alive))
                assert not errors, errors
                assert not results[-1].stats.drafter_lost
        finally:
            jobs.put(None)
            thread.join(10)
        assert not thread.is_alive() and not errors, errors
        return results, stats
