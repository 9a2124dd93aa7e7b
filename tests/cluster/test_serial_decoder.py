"""SerialDecoder: one request at a time on its own thread; closing it leaves nobody waiting."""

from __future__ import annotations

import threading
import time

import cluster.decoder as decoder_module
from cluster.decoder import Request, SerialDecoder, wait_idle
from decoding.request import DecodeConfig, GenerationResult, GenerationStats


class SlowEngine:
    """Emits one token per call of `on_tokens` until told to stop; counts closes."""

    def __init__(self):
        self.started = threading.Event()
        self.closed = 0

    def generate(self, prompt_ids, cfg, speculative, on_tokens):
        self.started.set()
        out = []
        for i in range(cfg.max_new_tokens):
            out.append(i)
            if on_tokens([i]):
                break
            threading.Event().wait(0.01)
        return GenerationResult(out, GenerationStats(new_tokens=len(out)))

    def runtime_info(self):
        return {}

    def close(self):
        self.closed += 1


def test_close_stops_the_running_request_fails_the_waiting_ones_and_joins_the_thread():
    engine = SlowEngine()
    dec = SerialDecoder(engine, engine.generate, tokenizer=None, context_length=4096)
    running, waiting = [], []
    dec.submit(Request([1], DecodeConfig(max_new_tokens=10_000)), running.append)
    dec.submit(Request([2], DecodeConfig(max_new_tokens=5)), waiting.append)
    assert engine.started.wait(10)
    dec.close()
    assert not dec._thread.is_alive()  # joined: no daemon thread left to free the engine at exit
    assert engine.closed == 1
    assert running[-1].finish_reason == "cancelled" and len(running) < 10_000
    assert [e.finish_reason for e in waiting] == ["error"] and "closed" in waiting[0].error


def test_requests_run_in_order_with_all_their_tokens():
    engine = SlowEngine()
    dec = SerialDecoder(engine, engine.generate, tokenizer=None, context_length=4096, eos_token_ids=(2,))
    try:
        a = dec.generate([1], DecodeConfig(max_new_tokens=3))
        b = dec.generate([1], DecodeConfig(max_new_tokens=5))
    finally:
        dec.close()
    assert a.token_ids == [0, 1, 2] and b.token_ids == [0, 1, 2, 3, 4]


def test_health_names_a_request_without_progress_and_a_dead_thread(monkeypatch):
    monkeypatch.setattr(decoder_module, "STALL_S", 0.2)
    release = threading.Event()

    def wedged(prompt_ids, cfg, speculative, on_tokens):
        on_tokens([7])
        release.wait(30)  # stuck: no more tokens
        return GenerationResult([7], GenerationStats(new_tokens=1))

    dec = SerialDecoder(SlowEngine(), wedged, tokenizer=None, context_length=4096)
    try:
        assert dec.health() is None  # idle is healthy however long
        dec.submit(Request([1], DecodeConfig(max_new_tokens=5)), lambda ev: None)
        deadline = time.monotonic() + 10
        while dec.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "no progress" in dec.health()
        release.set()
        wait_idle(dec)
        assert dec.health() is None
    finally:
        dec.close()

    def dies(prompt_ids, cfg, speculative, on_tokens):
        raise SystemExit  # not an Exception: the decoder's thread ends

    dec = SerialDecoder(SlowEngine(), dies, tokenizer=None, context_length=4096)
    dec.submit(Request([1], DecodeConfig(max_new_tokens=5)), lambda ev: None)
    dec._thread.join(10)
    assert "not running" in dec.health()
