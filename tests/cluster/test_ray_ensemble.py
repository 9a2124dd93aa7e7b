"""Ensembles with each member in its own Ray actor (a local cluster, 2 CPUs, 2 fake GPUs):
same tokens as in process, streaming, and a member SIGKILLed mid-request gives a clear
error within bounded time, after which the next request works."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from actors import loading
from actors.ensemble import CosOptions, cos_generate, ensemble_generate
from actors.ensemble_member import local_members
from actors.model import Transformer
from actors.runner import ModelRunner
from cluster.ensemble import EnsembleConfig
from cluster.ray_ensemble import EnsembleMemberFailed, RayEnsemble
from decoding.ensemble import parse_combine
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams

COMBINE = "we:0.4"


@pytest.fixture(scope="module")
def models(tiny_dir):
    return tiny_dir("llama"), tiny_dir("llama", noise=0.3)


@pytest.fixture(scope="module")
def ensemble(local_ray, models):
    with RayEnsemble(EnsembleConfig(models, COMBINE, member_ready_s=60, request_timeout_s=120)) as ens:
        ens.info.context_length = 10**6  # tiny models decode past their nominal 512: long requests to kill
        yield ens


@pytest.fixture(scope="module")
def local(models):
    return local_members([ModelRunner(Transformer.from_hf(loading.load(m, progress=False).hf_model), 4096)
                          for m in models])


def test_members_take_their_own_devices(ensemble):
    a, b = ensemble.member_info
    assert ensemble.placement.use_gpus and a["gpu_ids"] != b["gpu_ids"] and a["pid"] != b["pid"]


def test_same_tokens_as_in_process(ensemble, local):
    rule = parse_combine(COMBINE, 2)
    for prompt in ([5, 6, 7], [9]):
        cfg = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
        expected = ensemble_generate(local, rule, prompt, cfg).token_ids
        assert ensemble.generate(prompt, cfg, method="ensemble").token_ids == expected
        cos = ensemble.generate(prompt, cfg, method="cos")
        assert cos.token_ids == expected and cos.stats.verify_rounds > 0
        sampled = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,), draft_length=3, seed=7,
                               sampling=SamplingParams(temperature=1.0))
        want = cos_generate(local, rule, prompt, sampled, CosOptions(default_proposer=0)).token_ids
        assert ensemble.generate(prompt, sampled).token_ids == want


def test_streaming_and_a_sink_that_raises(ensemble):
    seen: list[int] = []
    cfg = DecodeConfig(max_new_tokens=30, eos_token_ids=(-1,))
    result = ensemble.generate([3, 4], cfg, on_tokens=seen.extend)
    assert seen == result.token_ids

    def gone(tokens):
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        ensemble.generate([3, 4], DecodeConfig(max_new_tokens=2000, eos_token_ids=(-1,)), on_tokens=gone)
    assert ensemble.generate([3, 4], cfg).token_ids == result.token_ids  # members freed


@pytest.mark.parametrize("victim, method", [(1, "ensemble"), (0, "cos")])
def test_member_death_is_a_clear_error_and_the_next_request_works(ensemble, models, victim, method):
    box = {}
    cfg = DecodeConfig(max_new_tokens=3000, eos_token_ids=(-1,))

    def run():
        try:
            box["result"] = ensemble.generate([4, 4, 2], cfg, method=method)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["error"] = exc
        box["done_at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), "request finished before the kill; make it longer"
    killed_at = time.monotonic()
    old_pid = ray.get(ensemble.actors[victim].info.remote())["pid"]
    os.kill(old_pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the request hung after the kill"
    assert isinstance(box.get("error"), EnsembleMemberFailed), box
    assert box["error"].model == models[victim] and "retry" in str(box["error"])
    assert box["done_at"] - killed_at < 30
    again = ensemble.generate([5, 6, 7], DecodeConfig(max_new_tokens=20, eos_token_ids=(-1,)))
    assert len(again.token_ids) == 20
    assert ray.get(ensemble.actors[victim].info.remote())["pid"] != old_pid
