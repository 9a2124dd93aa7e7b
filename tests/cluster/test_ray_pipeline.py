"""The sync and async pipelines with verifier and drafter in real Ray actors (a local
cluster with 2 CPUs and 2 fake GPUs): greedy output equals the target alone, the actors
land on their own bundles, and the pipeline survives either actor dying mid-request."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time

import pytest
import ray

from actors import loading
from actors.model import Transformer
from actors.pipeline_options import PipelineOptions
from actors.runner import ModelRunner
from cluster.local import autoregressive_generate
from cluster.pipeline import PipelineConfig, RayPipeline, RequestTimeout, VerifierFailed
from decoding.request import DecodeConfig

PROMPTS = [[5, 6, 7], [9], [3, 14, 15, 9, 2, 6, 5]]


@pytest.fixture(scope="module")
def models(tiny_dir):
    return tiny_dir("llama"), tiny_dir("llama", noise=0.3)


@pytest.fixture(scope="module")
def pipeline(local_ray, models):
    target, draft = models
    with RayPipeline(PipelineConfig(target, draft, draft_dtype="float32", drafter_ready_s=60,
                                    request_timeout_s=120)) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def reference(models):
    runner = ModelRunner(Transformer.from_hf(loading.load(models[0], progress=False).hf_model), 4096)

    def generate(prompt, n):
        return autoregressive_generate(runner, prompt, DecodeConfig(max_new_tokens=n, eos_token_ids=(-1,))).token_ids

    return generate


def test_actors_take_their_devices_from_ray(pipeline):
    v, d = pipeline.verifier_info, pipeline.drafter_info
    assert pipeline.placement.use_gpus  # 2 (fake) GPUs for 2 actors: GPU bundles
    assert len(v["gpu_ids"]) == len(d["gpu_ids"]) == 1 and v["gpu_ids"] != d["gpu_ids"]
    assert v["device"] == d["device"] == "cpu"  # Ray assigned GPUs, but torch has no CUDA here
    assert v["threads"] == d["threads"] == 1
    assert v["pid"] != d["pid"]


@pytest.mark.parametrize("mode", ["sync", "async", "ssd"])
def test_greedy_output_is_the_targets_own(pipeline, reference, mode):
    for prompt in PROMPTS:
        for lookahead in (2, 8):
            cfg = DecodeConfig(max_new_tokens=48, eos_token_ids=(-1,))
            result = pipeline.generate(prompt, cfg, PipelineOptions(mode=mode, lookahead=lookahead))
            assert result.token_ids == reference(prompt, 48), (prompt, lookahead)
            assert result.stats.verify_rounds > 0 and not result.stats.drafter_lost
            assert result.stats.draft_s > 0


def _kill_during(pipeline, actor_info, run):
    """Run `run()` in a thread, SIGKILL the actor's process once it is under way."""
    box = {}

    def target():
        try:
            box["result"] = run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            box["error"] = exc
        box["done_at"] = time.monotonic()

    thread = threading.Thread(target=target)
    thread.start()
    time.sleep(0.8)
    assert thread.is_alive(), "request finished before the kill; make it longer"
    killed_at = time.monotonic()
    os.kill(actor_info["pid"], signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the request hung after the kill"
    box["seconds_after_kill"] = box["done_at"] - killed_at
    return box


@pytest.mark.parametrize("mode", ["sync", "async", "ssd"])
def test_drafter_death_mid_request_keeps_the_output(pipeline, reference, mode):
    prompt, n = [4, 4, 2], 3000
    cfg = DecodeConfig(max_new_tokens=n, eos_token_ids=(-1,))
    old_pid = pipeline.drafter_info["pid"]
    box = _kill_during(pipeline, pipeline.drafter_info,
                       lambda: pipeline.generate(prompt, cfg, PipelineOptions(mode=mode)))
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.stats.drafter_lost and result.stats.verify_rounds > 0
    assert result.token_ids == reference(prompt, n)
    # Ray restarts the drafter; the next request waits for it and speculates again.
    again = pipeline.generate(PROMPTS[0], DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,)),
                              PipelineOptions(mode=mode))
    assert again.token_ids == reference(PROMPTS[0], 32)
    assert not again.stats.drafter_lost and again.stats.verify_rounds > 0
    pipeline.drafter_info = ray.get(pipeline.drafter.info.remote())
    assert pipeline.drafter_info["pid"] != old_pid


def test_verifier_death_is_a_clear_error_and_the_next_request_works(pipeline, reference):
    cfg = DecodeConfig(max_new_tokens=3000, eos_token_ids=(-1,))
    box = _kill_during(pipeline, pipeline.verifier_info,
                       lambda: pipeline.generate([4, 4, 2], cfg, PipelineOptions(mode="async")))
    assert isinstance(box.get("error"), VerifierFailed), box
    assert "verifier" in str(box["error"]) and "retry" in str(box["error"])
    assert box["seconds_after_kill"] < 60  # bounded: Ray reports the death, nothing waits for a timeout
    result = pipeline.generate(PROMPTS[0], DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,)),
                               PipelineOptions(mode="sync"))
    assert result.token_ids == reference(PROMPTS[0], 32) and not result.stats.drafter_lost
    new_info = ray.get(pipeline.verifier.info.remote())
    assert new_info["pid"] != pipeline.verifier_info["pid"]
    pipeline.verifier_info = new_info


def test_a_stopped_verifier_times_the_request_out_and_is_replaced(pipeline, reference):
    """The verifier's process is stopped (SIGSTOP: alive, never answering): the request fails
    within its deadline, the stuck actor is killed (Ray restarts it) and the next request is
    served by the new one."""
    stuck = pipeline.verifier_info["pid"]
    cfg, pipeline.cfg = pipeline.cfg, dataclasses.replace(pipeline.cfg, request_timeout_s=4)
    os.kill(stuck, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(RequestTimeout):
            pipeline.generate(PROMPTS[0], DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,)),
                              PipelineOptions(mode="sync"))
        assert time.monotonic() - began < 4 + 5 + 5  # its deadline, the ping, the kill
    finally:
        pipeline.cfg = cfg
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGKILL)  # never leave a stopped process behind
    result = pipeline.generate(PROMPTS[0], DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,)),
                               PipelineOptions(mode="sync"))
    assert result.token_ids == reference(PROMPTS[0], 32)
    pipeline.verifier_info = ray.get(pipeline.verifier.info.remote())
    assert pipeline.verifier_info["pid"] != stuck
