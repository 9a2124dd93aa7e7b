"""Continuous batching is exact: each request's output is the one it gets alone, whatever
joins or leaves around it; sampling keeps the target's distribution; seeds reproduce."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter

import pytest
import torch

import cluster.batching.engine as batch_engine
import decoding.round as spec_round
from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.decoder import Request, wait_idle
from cluster.engine import EngineConfig, LocalEngine
from decoding.acceptance import Verdict
from decoding.draft_length import CostModel
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams

from sampling_check import MODEL, NEW, PROMPT, chi2_pvalue, exact_sequence_probs

NO_EOS = (-1,)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def engines(request, tiny_dir):
    family = request.param
    local = LocalEngine(EngineConfig(tiny_dir(family), tiny_dir(family, noise=0.2), draft_dtype="float32",
                                     max_len=256), False)
    return local


def collect(decoder, requests, cancel_after: dict[str, int] | None = None, timeout: float = 120, hook=None):
    """Submit all, gather every request's events; cancel some after N tokens. `hook(event)`
    runs on the decoder's thread as each event is sent (blocking there holds the next step)."""
    events: queue.Queue = queue.Queue()

    def sink(event) -> None:
        events.put(event)
        if hook is not None:
            hook(event)

    for r in requests:
        decoder.submit(r, sink)
    out = {r.id: [] for r in requests}
    last = {}
    while len(last) < len(requests):
        ev = events.get(timeout=timeout)
        out[ev.request_id] += ev.token_ids
        if cancel_after and ev.request_id in cancel_after and len(out[ev.request_id]) >= cancel_after[ev.request_id]:
            decoder.cancel(ev.request_id)
        if ev.done:
            last[ev.request_id] = ev
    return out, last


def mixed_requests(seed: int, n: int, **cfg):
    gen = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        prompt = torch.randint(2, 64, (int(torch.randint(1, 40, (), generator=gen)),), generator=gen).tolist()
        max_new = int(torch.randint(1, 40, (), generator=gen))
        eos = (int(torch.randint(2, 64, (), generator=gen)),) if i % 3 == 0 else NO_EOS
        reqs.append(Request(prompt, DecodeConfig(max_new_tokens=max_new, eos_token_ids=eos, **cfg),
                            speculative=i % 4 != 1))
    return reqs


@pytest.mark.parametrize("draft_length", [None, 0, 3])
def test_greedy_batched_equals_alone(engines, draft_length):
    local = engines
    batch = BatchEngine(local, BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=draft_length))
    try:
        reqs = mixed_requests(draft_length or 11, 10)
        cancel = {reqs[2].id: 5, reqs[7].id: 1}
        got, last = collect(batch, reqs, cancel)
        accepted = 0
        for r in reqs:
            alone = local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids
            if r.id in cancel:
                assert got[r.id] == alone[:len(got[r.id])] and last[r.id].finish_reason in ("cancelled", "length",
                                                                                             "stop")
                continue
            assert got[r.id] == alone, r
            assert last[r.id].result.token_ids == alone
            accepted += last[r.id].result.stats.accepted_tokens
        if draft_length == 3:
            assert accepted > 0  # it really speculated
        if draft_length == 0:
            assert accepted == 0
        wait_idle(batch)
        assert batch.pool.available == 3 and batch.scheduler.reserved == 0  # every slot freed
    finally:
        batch.close()


def test_requests_wait_for_capacity_and_refusals_name_the_limit(engines):
    local = engines
    batch = BatchEngine(local, BatchConfig(max_seqs=2, kv_tokens=200, draft_length=2))
    try:
        with pytest.raises(ValueError, match="max_len of 256"):
            batch.submit(Request([1] * 250, DecodeConfig(max_new_tokens=10)), lambda e: None)
        with pytest.raises(ValueError, match="budget is 200"):
            batch.submit(Request([1] * 150, DecodeConfig(max_new_tokens=60)), lambda e: None)
        reqs = [Request([3, 4, 5], DecodeConfig(max_new_tokens=60, eos_token_ids=NO_EOS)) for _ in range(4)]
        got, last = collect(batch, reqs)
        assert all(len(got[r.id]) == 60 for r in reqs)  # each waited its turn (kv budget fits one at a time)
        assert batch.scheduler.reserved == 0
    finally:
        batch.close()


def test_seeded_sampling_reproduces_whatever_the_batch(engines):
    local = engines
    batch = BatchEngine(local, BatchConfig(max_seqs=4))
    try:
        params = SamplingParams(temperature=0.9, top_p=0.95)
        mine = Request([7, 8, 9], DecodeConfig(max_new_tokens=24, sampling=params, seed=42, eos_token_ids=NO_EOS),
                       speculative=False)
        alone, _ = collect(batch, [mine])
        others = mixed_requests(5, 5, sampling=params)
        again = Request(mine.prompt_ids, mine.cfg, speculative=False)
        got, _ = collect(batch, [*others[:3], again, *others[3:]])
        assert got[again.id] == alone[mine.id]
        assert local.generate(mine.prompt_ids, mine.cfg, speculative=False).token_ids == alone[mine.id]
    finally:
        batch.close()


def test_logprobs_are_the_targets_with_and_without_speculation(engines):
    local = engines
    batch = BatchEngine(local, BatchConfig(max_seqs=4, draft_length=3))
    try:
        cfg = DecodeConfig(max_new_tokens=20, eos_token_ids=NO_EOS)
        spec, plain = Request([4, 5, 6, 7], cfg, True, logprobs=2), Request([4, 5, 6, 7], cfg, False, logprobs=2)
        events: dict[str, list] = {spec.id: [], plain.id: []}
        q: queue.Queue = queue.Queue()
        batch.submit(spec, q.put)
        batch.submit(plain, q.put)
        done = 0
        while done < 2:
            ev = q.get(timeout=60)
            events[ev.request_id] += ev.logprobs or []
            done += ev.done
        a, b = events[spec.id], events[plain.id]
        assert [x.token for x in a] == [x.token for x in b] and len(a) == 20
        for x, y in zip(a, b):
            assert abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top] and len(x.top) == 2
            assert x.top[0][0] == x.token  # greedy: the chosen token is the target's top
        # and they are the target's own: recompute the first one alone
        runner = local.target_runner
        runner.reset(64)
        first = torch.log_softmax(runner.feed([4, 5, 6, 7]), -1)
        assert abs(float(first[a[0].token]) - a[0].logprob) < 1e-4
    finally:
        batch.close()


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir):
    target = tiny_dir("qwen2", **MODEL)
    draft = tiny_dir("qwen2", **MODEL, noise=0.3)
    return LocalEngine(EngineConfig(target, draft, draft_dtype="float32", max_len=64), False)


def batched_samples(local, params, n: int = 10_000):
    """n sequences of NEW tokens, 8 requests at a time in one batch, one seed each."""
    batch = BatchEngine(local, BatchConfig(max_seqs=8, draft_length=NEW - 1))
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(99)).tolist()
    try:
        reqs = [Request(PROMPT, DecodeConfig(max_new_tokens=NEW, sampling=params, seed=s, eos_token_ids=NO_EOS),
                        speculative=i % 5 != 0) for i, s in enumerate(seeds)]
        got, _ = collect(batch, reqs, timeout=600)
        return [tuple(got[r.id]) for r in reqs]
    finally:
        batch.close()


def test_batched_sampling_follows_the_target(tiny_pair):
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(tiny_pair.target_runner, params)
    samples = batched_samples(tiny_pair, params)
    assert chi2_pvalue(samples, probs) > 1e-3


def test_batched_sampling_check_catches_a_broken_acceptance(tiny_pair, monkeypatch):
    """Accepting every draft makes the output the draft's: the same check must fail."""
    def accept_all(tree, p, q, gen):
        return Verdict(list(range(1, tree.size)), int(torch.multinomial(p[-1], 1, generator=gen)))

    monkeypatch.setattr(spec_round, "verify_sampling", accept_all)
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(tiny_pair.target_runner, params)
    samples = batched_samples(tiny_pair, params, n=4000)
    assert chi2_pvalue(samples, probs) < 1e-6
    assert Counter(samples)  # sanity: it produced samples


def _scheduler(target_s: dict[int, float], draft_s: dict[int, float], acceptance: float, batch: int,
               margin: float = 0.05):
    from actors.drafters.draft_model import DraftModelDrafter, DraftState
    from actors.verifier import VerifyCosts
    from cluster.batching.scheduler import Scheduler
    from decoding.sequence import Sequence

    costs = VerifyCosts()
    costs.plain.verify_s.update(target_s)
    costs.trees.verify_s.update(target_s)
    drafter = DraftModelDrafter.__new__(DraftModelDrafter)  # its cost model only: no model, no caches
    drafter.step, drafter.catch_up_s = CostModel(), 0.01
    drafter.step.verify_s.update(draft_s)
    sched = Scheduler(BatchConfig(max_seqs=batch, margin=margin), drafter, costs)
    for i in range(batch):
        seq = Sequence(str(i), [1, 2, 3], DecodeConfig(max_new_tokens=64), True, None)
        seq.output, seq.acceptance = [4], acceptance
        seq.draft = DraftState(0, None, [1, 2, 3])
        sched.running.append(seq)
    return sched


def test_the_draft_length_follows_measured_costs_and_load():
    """Memory-bound verify (flat in rows) and a cheap draft: draft far. Compute-bound
    verify (linear in rows): drafting cannot pay, k = 0. Prompts waiting: k = 0."""
    flat = {1: 0.25, 8: 0.26, 16: 0.27, 64: 0.30, 256: 0.40}
    linear = {1: 0.25, 16: 4.0, 64: 16.0, 256: 64.0}
    cheap = {1: 0.01, 16: 0.02}
    assert _scheduler(flat, cheap, 0.8, 2).draft_length() >= 4
    assert _scheduler(flat, cheap, 0.05, 2).draft_length() <= 1  # a draft that is never right is not worth it
    assert _scheduler(linear, cheap, 0.8, 16).draft_length() == 0
    assert _scheduler(linear, cheap, 0.8, 1).draft_length() is None  # alone: the drafter's own policy decides
    busy = _scheduler(flat, cheap, 0.8, 1)
    busy.waiting.append(busy.running[0])
    assert busy.draft_length() == 0 and busy.state()["draft_length"] == 0


def test_drafting_must_beat_plain_steps_by_the_margin():
    """Where the estimate calls drafting barely better than k = 0 (within the cost model's
    error), the batch steps plainly; clearly better, it drafts as without a margin."""
    sublinear = {2: 0.2, 4: 0.25, 6: 0.3, 8: 0.35, 10: 0.4, 18: 0.6}
    cheap = {1: 0.001, 2: 0.001}
    marginal = clear = 0
    for a in [i / 100 for i in range(5, 95)]:
        bare, careful = _scheduler(sublinear, cheap, a, 2, 0.0), _scheduler(sublinear, cheap, a, 2, 0.05)
        k_bare, k_careful = bare.draft_length(), careful.draft_length()
        if k_bare == 0:
            assert k_careful == 0
            continue
        tokens, draft_s, rows = bare.drafter.estimate(bare.running, k_bare)
        gain = tokens / (draft_s + bare.costs.trees.verify(rows)) / (2 / bare.costs.plain.verify(2))
        if gain < 1.05:
            assert k_careful == 0, (a, gain)
            marginal += 1
        else:
            assert k_careful == k_bare, (a, gain)
            clear += 1
    assert marginal and clear  # the sweep crossed both zones


def test_a_joining_sequence_starts_from_what_finished_ones_accepted():
    from decoding.sequence import Sequence

    sched = _scheduler({1: 0.25}, {1: 0.01}, 0.2, 1)
    done = sched.running[0]
    done.stats.verify_rounds = 5
    sched.remove(done)
    assert abs(sched.acceptance - (0.7 * 0.7 + 0.3 * 0.2)) < 1e-9
    new = Sequence("new", [1, 2], DecodeConfig(max_new_tokens=8), True, None)
    sched.prefilling.append(new)
    sched.started(new)
    assert new.acceptance == sched.acceptance and abs(new.acc_hits / new.acc_tries - sched.acceptance) < 1e-9


def test_health_names_a_wedged_step_and_a_dead_engine_thread(engines, monkeypatch):
    """What Serve's health check reads: a step that does not end, a loop that died."""
    monkeypatch.setattr(batch_engine, "STALL_S", 0.2)
    batch = BatchEngine(engines, BatchConfig(max_seqs=2, draft_length=0))
    release, score = threading.Event(), batch.verifier.score

    def stuck(seqs, trees):
        release.wait(30)
        return score(seqs, trees)

    try:
        assert batch.health() is None
        monkeypatch.setattr(batch.verifier, "score", stuck)
        batch.submit(Request([5, 6], DecodeConfig(max_new_tokens=3, eos_token_ids=NO_EOS)), lambda ev: None)
        deadline = time.monotonic() + 10
        while batch.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "has run for" in batch.health()
        release.set()
        wait_idle(batch)
        assert batch.health() is None

        def dies():
            raise SystemExit  # not an Exception: the loop ends

        monkeypatch.setattr(batch, "_step", dies)
        batch.submit(Request([5, 6], DecodeConfig(max_new_tokens=3, eos_token_ids=NO_EOS)), lambda ev: None)
        batch._thread.join(10)
        assert "not running" in batch.health()
    finally:
        release.set()
        batch.close()


@pytest.mark.parametrize("where", ["accept", "first token"])
def test_a_sequence_that_fails_in_its_own_part_of_a_step_ends_alone(engines, monkeypatch, where):
    """One request's acceptance (or first token) raises: that request gets an error event,
    every other one in the same steps decodes exactly as alone, and its slot is freed."""
    local = engines
    batch = BatchEngine(local, BatchConfig(max_seqs=4, prefill_tokens=16, draft_length=3))
    reqs = [Request([3 + i, 9, 17 + i, 4], DecodeConfig(max_new_tokens=24, eos_token_ids=NO_EOS)) for i in range(4)]
    victim = reqs[1]
    seen = {"rounds": 0}
    real_accept, real_next = spec_round.accept, spec_round.next_token

    def accept(seq, draft, logits):
        seen["rounds"] += 1
        if seq.id == victim.id and len(seq.output) >= 5:
            raise IndexError("this sequence's state is broken")
        return real_accept(seq, draft, logits)

    def next_token(logits, params, generator):
        if seen.get("first") is None:  # the first prompt to complete: whichever it is, it fails
            seen["first"] = True
            raise IndexError("this sequence's state is broken")
        return real_next(logits, params, generator)

    if where == "accept":
        monkeypatch.setattr(spec_round, "accept", accept)
    else:
        monkeypatch.setattr(spec_round, "next_token", next_token)
    try:
        got, last = collect(batch, reqs)
        failed = [r for r in reqs if last[r.id].finish_reason == "error"]
        assert len(failed) == 1 and "IndexError: this sequence's state is broken" in last[failed[0].id].error
        if where == "accept":
            assert failed == [victim] and len(got[victim.id]) >= 5
        monkeypatch.undo()
        for r in reqs:
            if r not in failed:
                assert got[r.id] == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids
        wait_idle(batch)
        assert batch.pool.available == 4 and batch.scheduler.reserved == 0
    finally:
        batch.close()
