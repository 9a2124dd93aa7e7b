"""A draft model in its own server, over real ZeroMQ sockets and the protocol, drafting for
the batched engine: each request's greedy output is the target's alone, sampling keeps the
target's distribution (and the check fails when the acceptance rule is broken)."""

from __future__ import annotations

import dataclasses
import queue
import secrets
import threading
import time
from collections import Counter

import pytest
import torch

import decoding.round as spec_round
from actors.draft_server import DraftServer
from actors.drafters.remote import RemoteDrafter
from actors.ssd_server import SsdDraftServer
from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.decoder import Request, wait_idle
from cluster.engine import EngineConfig, LocalEngine
from cluster.local import autoregressive_generate
from decoding.acceptance import Verdict
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams
from protocol import (
    CandidateTree,
    ChannelConfig,
    DealerChannel,
    DraftCall,
    Role,
    RouterChannel,
    ipc_endpoint,
    link_auth,
    model_fingerprint,
)

from sampling_check import MODEL, NEW, PROMPT, chi2_pvalue, exact_sequence_probs
from test_batching import NO_EOS, collect, mixed_requests

FAST = ChannelConfig(recv_timeout_s=30, linger_s=0, tensor_lib="torch")


class Served:
    """A round server (draft model or heads) on its own thread behind a ROUTER socket, as
    its actor runs it."""

    def __init__(self, server, fingerprint, secret: str | None = None, role: Role = Role.DRAFTER):
        """`secret`: over tcp, authenticated as actors on two nodes are (CURVE keys from it)."""
        self.server, self.fingerprint, self.secret = server, fingerprint, secret
        endpoint = "tcp://127.0.0.1:*" if secret else ipc_endpoint()
        self.router = RouterChannel(endpoint, config=self.config(binds=True))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.router.serve, args=(self.server.handle,), daemon=True,
                                       kwargs=dict(role=role, fingerprint=self.fingerprint,
                                                   should_stop=self.stop.is_set, poll_s=0.02,
                                                   after_replies=server.after_replies))
        self.thread.start()

    def config(self, binds: bool) -> ChannelConfig:
        return dataclasses.replace(FAST, auth=link_auth("tcp://" if self.secret else "ipc://", self.secret,
                                                        binds=binds))

    def channel(self) -> DealerChannel:
        return DealerChannel(self.router.endpoint, config=self.config(binds=False))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.router.close()


class ServedDraft(Served):
    def __init__(self, draft: LocalEngine, verify_s: dict[int, float], max_draft: int = 4, mode: str = "sync",
                 secret: str | None = None, yields: bool = False):
        """`mode`: async drafts ahead, ssd pre-drafts the likeliest outcomes; `yields`: ssd's
        pre-drafting stops when the next call is waiting, as in the actor (else it finishes
        every wave first: hits then do not hang on timing)."""
        runner = draft.target_runner
        kind = SsdDraftServer if mode == "ssd" else DraftServer
        server = kind(runner, slots=8, max_len=256, max_draft=max_draft, verify_s=verify_s, ahead=mode == "async")
        super().__init__(server, model_fingerprint(runner.vocab_size, draft.tokenizer.get_vocab()), secret)
        if yields:
            server.interrupted = self.router.waiting
        self.max_draft, self.mode = max_draft, mode

    def drafter(self, timeout_s: float = 60.0) -> RemoteDrafter:
        drafter = RemoteDrafter(self.channel(), self.fingerprint, self.max_draft, timeout_s=timeout_s)
        drafter.pre_drafts = self.mode == "ssd"
        return drafter


def engine_with_remote_draft(target: str, draft: str, cfg: BatchConfig, max_len: int = 256, mode: str = "sync",
                             secret: str | None = None, yields: bool = False):
    local = LocalEngine(EngineConfig(target, max_len=max_len), False)
    served = ServedDraft(LocalEngine(EngineConfig(draft, max_len=max_len), False), local.verify_costs, mode=mode,
                         secret=secret, yields=yields)
    return local, served, BatchEngine(local, cfg, drafter=served.drafter())


@pytest.mark.parametrize("draft_length,mode,tcp,yields", [
    (None, "sync", False, False), (3, "sync", False, False), (None, "async", False, False),
    (2, "async", False, False), (3, "async", True, False),
    (None, "ssd", False, False), (3, "ssd", False, False), (3, "ssd", False, True), (None, "ssd", False, True)])
def test_remote_draft_batched_greedy_equals_the_target_alone(tiny_dir, draft_length, mode, tcp, yields):
    """async: the server drafts each next round while this side verifies, betting all is
    kept; ssd: it pre-drafts the likeliest outcomes (`yields`: until the next call comes).
    `tcp`: the link two nodes use, authenticated by keys derived from the pipeline's secret."""
    cfg = BatchConfig(max_seqs=3, prefill_tokens=16, draft_length=draft_length)
    local, served, batch = engine_with_remote_draft(tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.2), cfg, mode=mode,
                                                    secret=secrets.token_hex(32) if tcp else None, yields=yields)
    try:
        reqs = mixed_requests(7, 8)
        cancel = {reqs[4].id: 3}
        got, last = collect(batch, reqs, cancel)
        drafted = accepted = 0
        for r in reqs:
            alone = local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids
            if r.id in cancel:
                assert got[r.id] == alone[:len(got[r.id])]
                continue
            assert got[r.id] == alone, r
            assert not last[r.id].result.stats.drafter_lost  # every tree the server sent passed the checks
            drafted += last[r.id].result.stats.drafted_tokens
            accepted += last[r.id].result.stats.accepted_tokens
        if draft_length:
            assert 0 < accepted < drafted  # drafts were kept and drafts were refused, over the wire
        if mode == "async":  # drafts made ahead were used (and, at a fixed depth, some thrown away)
            assert served.server.hits > 0 and (served.server.misses > 0 or not draft_length)
        if mode == "ssd" and not yields:  # every wave drafted: pre-drafts were used, and counted here too
            stats = [last[r.id].result.stats for r in reqs if r.id not in cancel]
            assert served.server.hits > 0 and served.server.predrafted > 0
            assert sum(s.predraft_hits for s in stats) > 0
            assert sum(s.predraft_misses for s in stats) > 0 or not draft_length
        wait_idle(batch)
        assert batch.pool.available == 3 and not served.server.mirrors  # every session released there too
    finally:
        batch.close()
        served.close()


def test_a_draft_server_that_goes_silent_leaves_the_target_decoding_alone(tiny_dir):
    """The server stops mid-run: the rounds after go on without drafts (exact), nothing fails."""
    local = LocalEngine(EngineConfig(tiny_dir("qwen2"), max_len=256), False)
    draft = LocalEngine(EngineConfig(tiny_dir("qwen2", noise=0.2), max_len=256), False)
    served = ServedDraft(draft, local.verify_costs)
    drafter = served.drafter(timeout_s=1.0)
    batch = BatchEngine(local, BatchConfig(max_seqs=4, draft_length=3), drafter=drafter)
    reqs = mixed_requests(3, 4, max_draft_length=3)
    events: queue.Queue = queue.Queue()
    try:
        for r in reqs:
            batch.submit(r, events.put)
        got, last = {r.id: [] for r in reqs}, {}
        while len(last) < len(reqs):
            ev = events.get(timeout=120)
            got[ev.request_id] += ev.token_ids
            if ev.token_ids and not served.stop.is_set():
                served.close()  # the server goes after the first tokens
            if ev.done:
                last[ev.request_id] = ev
        for r in reqs:
            assert last[r.id].error is None
            assert got[r.id] == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert drafter.lost and any(last[r.id].result.stats.drafter_lost for r in reqs)
    finally:
        batch.close()


def hold_until_reconnected(drafter: RemoteDrafter, timeout_s: float) -> None:
    """Called on the engine's thread once the drafter is lost: hold the next round until the
    reconnect thread has a new server, so the rounds after use it (the tests need them to)."""
    if drafter.lost and not drafter.restarts:
        deadline = time.monotonic() + timeout_s
        while drafter._fresh is None and time.monotonic() < deadline:
            time.sleep(0.01)


def test_a_lost_draft_server_is_replaced_and_running_requests_draft_again(tiny_dir):
    """The server dies mid-run (as an actor crashes): the target decodes on alone, `reconnect`
    brings a new server (as Ray restarts the actor), and every running request is handed
    to it with all its committed tokens; outputs stay the target's own."""
    local = LocalEngine(EngineConfig(tiny_dir("qwen2"), max_len=256), False)
    draft = LocalEngine(EngineConfig(tiny_dir("qwen2", noise=0.2), max_len=256), False)
    first, second, calls = ServedDraft(draft, local.verify_costs), [], []

    def reconnect() -> DealerChannel:
        served = ServedDraft(draft, local.verify_costs)
        answer = served.server.answer
        served.server.answer = lambda cs: calls.extend((c.session_id, c.position, len(c.token_ids)) for c in cs) \
            or answer(cs)
        second.append(served)
        return served.channel()

    drafter = RemoteDrafter(first.channel(), first.fingerprint, first.max_draft, timeout_s=30.0,
                            reconnect=reconnect, alive=lambda: not first.stop.is_set())
    batch = BatchEngine(local, BatchConfig(max_seqs=4, draft_length=3), drafter=drafter)
    gen = torch.Generator().manual_seed(5)
    reqs = [Request(torch.randint(2, 64, (9,), generator=gen).tolist(),
                    DecodeConfig(max_new_tokens=70, eos_token_ids=NO_EOS)) for _ in range(3)]

    def kill_then_wait(ev) -> None:
        if ev.token_ids and not first.stop.is_set():
            first.close()  # the server dies after the first tokens
        else:
            hold_until_reconnected(drafter, 60)

    try:
        got, last = collect(batch, reqs, hook=kill_then_wait)
        for r in reqs:
            assert last[r.id].error is None
            assert got[r.id] == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert any(last[r.id].result.stats.drafter_lost for r in reqs)  # a round went without drafts
        assert drafter.restarts == 1 and drafter.lost is None
        # each request was introduced to the new server from position 0, with what it had committed
        introduced = {sid: n for sid, position, n in calls if position == 0}
        assert set(introduced) == {r.id for r in reqs}
        assert all(introduced[r.id] > len(r.prompt_ids) for r in reqs)
        assert sum(last[r.id].result.stats.accepted_tokens for r in reqs) > 0
    finally:
        batch.close()
        for served in second:
            served.close()


@pytest.mark.parametrize("corrupt", ["token past the vocabulary", "probabilities of the wrong width"])
def test_a_bad_tree_from_the_server_loses_the_drafter_not_the_requests(tiny_dir, corrupt):
    """The verifier checks what the server sends before the target reads it: the requests
    finish with the target's own output, the drafter is marked lost, naming the fault."""
    local = LocalEngine(EngineConfig(tiny_dir("qwen2"), max_len=256), False)
    served = ServedDraft(LocalEngine(EngineConfig(tiny_dir("qwen2", noise=0.2), max_len=256), False),
                         local.verify_costs)
    answer, vocab = served.server.answer, served.fingerprint.vocab_size

    def bad(calls):
        trees = answer(calls)
        t = trees[0]
        if len(t.token_ids) > 1 and corrupt.startswith("token"):
            t.token_ids = (*t.token_ids[:-1], vocab + 3)
        elif len(t.token_ids) > 1:
            t.draft_probs = torch.full((len(t.token_ids), vocab - 1), 1.0 / (vocab - 1))
        return trees

    served.server.answer = bad
    drafter = served.drafter()
    batch = BatchEngine(local, BatchConfig(max_seqs=3, draft_length=3), drafter=drafter)
    try:
        reqs = mixed_requests(4, 3)
        got, last = collect(batch, reqs)
        for r in reqs:
            assert last[r.id].error is None
            assert got[r.id] == local.generate(r.prompt_ids, r.cfg, speculative=False).token_ids, r
        assert drafter.lost and ("vocabulary" in drafter.lost if corrupt.startswith("token") else
                                 "shape" in drafter.lost)
    finally:
        batch.close()
        served.close()


@pytest.fixture(scope="module")
def vocab4_remote(tiny_dir):
    """A server drafting ahead, 5 tokens drafted one at a time: each request's second round
    takes the draft made ahead (its first draft accepted, the bonus guessed right) or one
    drafted fresh, as a server that does not draft ahead always does; both paths are judged."""
    target, draft = tiny_dir("qwen2", **MODEL), tiny_dir("qwen2", **MODEL, noise=0.3)
    local = LocalEngine(EngineConfig(target, max_len=64), False)
    served = ServedDraft(LocalEngine(EngineConfig(draft, max_len=64), False), local.verify_costs,
                         max_draft=NEW - 1, mode="async")
    yield local, served, (NEW + 1, 1)
    served.close()


def remote_samples(local, served, n: int, new: int, draft_length: int) -> list[tuple[int, ...]]:
    batch = BatchEngine(local, BatchConfig(max_seqs=8, draft_length=draft_length), drafter=served.drafter())
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(17)).tolist()
    params = SamplingParams(temperature=1.0)
    try:
        reqs = [Request(PROMPT, DecodeConfig(max_new_tokens=new, sampling=params, seed=s, eos_token_ids=NO_EOS))
                for s in seeds]
        got, _ = collect(batch, reqs, timeout=900)
        return [tuple(got[r.id]) for r in reqs]
    finally:
        batch.close()


def test_remote_draft_batched_sampling_follows_the_target(vocab4_remote):
    local, served, (new, k) = vocab4_remote
    probs = exact_sequence_probs(local.target_runner, SamplingParams(temperature=1.0), new=new)
    hits, misses = served.server.hits, served.server.misses
    assert chi2_pvalue(remote_samples(local, served, 10_000, new, k), probs) > 1e-3
    # many requests took a draft made ahead, many had theirs drafted fresh
    assert served.server.hits - hits > 500 and served.server.misses - misses > 500


class Countdown:
    """`interrupted` that turns True after `n` questions: the next call arriving mid-wave."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self) -> bool:
        self.n -= 1
        return self.n < 0


@pytest.mark.parametrize("alone", [False, True])
def test_ssd_server_answers_a_covered_outcome_with_the_draft_a_fresh_round_would_make(tiny_dir, alone):
    """Driven call by call (no timing): a round is answered, the next call interrupts the
    pre-drafting after a few steps, and commits the likeliest outcome. The answer is the
    pre-draft (rank 0), completed to the call's depth, token for token the draft's own
    greedy chain from there, and never past the depth the verifier's checks allow."""
    draft = LocalEngine(EngineConfig(tiny_dir("qwen2", noise=0.2), max_len=256), False)
    server = SsdDraftServer(draft.target_runner, slots=2, max_len=256, max_draft=4, verify_s={1: 0.01, 4: 0.02})
    prompt, depth = [5, 6, 7, 8], 4

    def call(step: int, tokens: list[int], position: int) -> CandidateTree:
        (tree,) = server.handle(b"p", DraftCall(session_id="s", step=step, token_ids=tokens, position=position,
                                                depth=depth, remaining=40 - position, batch=1, alone=alone))
        return tree

    first = call(1, prompt, 0)
    server.interrupted = Countdown(3)  # the "after" step, then two steps into the rank-0 branch
    server.after_replies()
    (rank, branch, cut), = [v for v in server.pending_of["s"].branches.values() if v[0] == 0]
    assert cut or alone  # alone, the draft's own policy may have stopped the chain before the call came
    outcome = [k for k, v in server.pending_of["s"].branches.items() if v[0] == 0][0]
    committed = prompt + list(outcome)
    tree = call(2, list(outcome), len(prompt))
    assert tree.pre_drafted == 0 and server.hits == 1
    assert len(tree.token_ids) - 1 <= depth
    own = autoregressive_generate(draft.target_runner, committed, DecodeConfig(max_new_tokens=len(tree.token_ids) - 1))
    assert list(tree.token_ids) == [committed[-1], *own.token_ids]
    assert first.pre_drafted is None


@pytest.fixture(scope="module")
def vocab4_ssd(tiny_dir):
    """A server pre-drafting (ssd), chains of 2: from the second round on a request takes
    a pre-draft when its verdict's outcome was among those covered (kept drafts and the
    bonus guessed right), else a fresh one; both paths are judged."""
    target, draft = tiny_dir("qwen2", **MODEL), tiny_dir("qwen2", **MODEL, noise=0.3)
    local = LocalEngine(EngineConfig(target, max_len=64), False)
    served = ServedDraft(LocalEngine(EngineConfig(draft, max_len=64), False), local.verify_costs,
                         max_draft=NEW - 1, mode="ssd")
    yield local, served
    served.close()


def test_ssd_batched_sampling_follows_the_target(vocab4_ssd):
    local, served = vocab4_ssd
    new = NEW + 1
    probs = exact_sequence_probs(local.target_runner, SamplingParams(temperature=1.0), new=new)
    hits, misses = served.server.hits, served.server.misses
    assert chi2_pvalue(remote_samples(local, served, 10_000, new, 2), probs) > 1e-3
    assert served.server.hits - hits > 500 and served.server.misses - misses > 500


def test_ssd_seeded_sampling_reproduces_whatever_the_timing(tiny_dir):
    """Pre-drafting stops when the next call comes, so how much of it is done varies from
    run to run; a seeded request's output must not."""
    cfg = BatchConfig(max_seqs=2, prefill_tokens=16, draft_length=3)
    local, served, batch = engine_with_remote_draft(tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.2), cfg, mode="ssd",
                                                    yields=True)
    params = SamplingParams(temperature=1.0)
    try:
        runs = []
        for _ in range(3):
            reqs = [Request([5, 6, 7], DecodeConfig(max_new_tokens=24, sampling=params, seed=s, eos_token_ids=NO_EOS))
                    for s in (11, 12)]
            got, _ = collect(batch, reqs)
            runs.append([got[r.id] for r in reqs])
        assert runs[0] == runs[1] == runs[2]
    finally:
        batch.close()
        served.close()


def test_remote_draft_sampling_check_catches_a_broken_acceptance(vocab4_remote, monkeypatch):
    """Accepting every draft makes the output the draft's: the same check must fail."""
    def accept_all(tree, p, q, gen):
        return Verdict(list(range(1, tree.size)), int(torch.multinomial(p[-1], 1, generator=gen)))

    local, served, (new, k) = vocab4_remote
    monkeypatch.setattr(spec_round, "verify_sampling", accept_all)
    probs = exact_sequence_probs(local.target_runner, SamplingParams(temperature=1.0), new=new)
    samples = remote_samples(local, served, 4000, new, k)
    assert chi2_pvalue(samples, probs) < 1e-6 and Counter(samples)
