"""The ensemble loops with members behind real ZeroMQ sockets (threads of this process; the
Ray test puts them in actors): same tokens as in process, greedy and sampled with a seed,
and a member that stops answering is a clear error, not a hang; a member that joins before
the previous request has left the leader is kept for its own request."""

from __future__ import annotations

import threading
import time

import pytest

from actors import loading
from actors.ensemble import CosOptions, CosState, cos_generate, ensemble_generate
from actors.ensemble_member import LocalMember, MemberLost, local_members
from actors.ensemble_peers import LeaderLink, PeerOptions, RemoteMember, serve_member
from actors.model import Transformer
from actors.pipeline_options import Cancelled
from actors.runner import ModelRunner
from decoding.ensemble import parse_combine
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams
from protocol import ChannelConfig, DealerChannel, ModelFingerprint, RouterChannel, ipc_endpoint, new_session_id

FINGERPRINT = ModelFingerprint(vocab_size=1, tokenizer_hash="t" * 64)
CHANNEL = ChannelConfig(tensor_lib="torch", recv_timeout_s=10, connection_heartbeat_s=None)
PEER = PeerOptions(handshake_timeout_s=10, reply_timeout_s=10, idle_timeout_s=10)


def load_runner(path: str) -> ModelRunner:
    return ModelRunner(Transformer.from_hf(loading.load(path, progress=False).hf_model), 256)


@pytest.fixture(scope="module")
def paths(tiny_dir):
    return [tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.3), tiny_dir("llama", seed=3)]


class Ensemble:
    """Member 0 leads in this thread; the others serve from threads over ipc sockets."""

    def __init__(self, paths):
        self.runners = [load_runner(p) for p in paths]
        self.router = RouterChannel(ipc_endpoint(), config=CHANNEL)

    def generate(self, rule, prompt, cfg, method="cos", opts=None, stop_member_after: float | None = None):
        session, n = new_session_id(), len(self.runners)
        stops = {i: threading.Event() for i in range(1, n)}
        threads = {}
        for i in range(1, n):
            def serve(i=i):
                with DealerChannel(self.router.endpoint, config=CHANNEL) as dealer:
                    try:
                        serve_member(self.runners[i], dealer, FINGERPRINT, session, i, cfg, PEER,
                                     cancelled=stops[i].is_set)
                    except Exception:  # noqa: BLE001 - a cancelled member just stops
                        pass
            threads[i] = threading.Thread(target=serve, daemon=True)
            threads[i].start()
        if stop_member_after is not None:
            threading.Timer(stop_member_after, stops[n - 1].set).start()
        link = LeaderLink(self.router, FINGERPRINT, session, {i: f"m{i}" for i in range(1, n)}, PEER,
                          alive=lambda i: threads[i].is_alive(), cancelled=lambda: False)
        members = [LocalMember(self.runners[0], "m0", 0)] + [RemoteMember(link, i, f"m{i}", session)
                                                            for i in range(1, n)]
        try:
            link.accept()
            if method == "ensemble":
                return ensemble_generate(members, rule, prompt, cfg)
            return cos_generate(members, rule, prompt, cfg, opts or CosOptions(), state=CosState())
        finally:
            link.close("done")
            for t in threads.values():
                t.join(10)


@pytest.mark.parametrize("n, combine", [(2, "we:0.5"), (2, "cd:0.2"), (3, "we:1,1,1")])
def test_over_sockets_equals_in_process(paths, n, combine):
    ens = Ensemble(paths[:n])
    rule = parse_combine(combine, n)
    local = local_members([load_runner(p) for p in paths[:n]])
    greedy = DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,))
    expected = ensemble_generate(local, rule, [5, 6, 7], greedy).token_ids
    assert ens.generate(rule, [5, 6, 7], greedy, method="ensemble").token_ids == expected
    for proposer in range(n):
        opts = CosOptions(default_proposer=proposer, fallback=False)
        fixed = DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,), draft_length=3)
        assert ens.generate(rule, [5, 6, 7], fixed, opts=opts).token_ids == expected, proposer
        # Sampling with a seed: the same coins wherever the members run.
        sampled = DecodeConfig(max_new_tokens=32, eos_token_ids=(-1,), draft_length=3, seed=11,
                               sampling=SamplingParams(temperature=1.0, top_p=0.9))
        want = cos_generate(local, rule, [5, 6, 7], sampled, opts).token_ids
        assert ens.generate(rule, [5, 6, 7], sampled, opts=opts).token_ids == want, proposer


def test_a_member_that_stops_answering_is_a_clear_error(paths):
    ens = Ensemble(paths[:3])
    cfg = DecodeConfig(max_new_tokens=100_000 // 2, eos_token_ids=(-1,))
    ens.runners = [ModelRunner(r.model, 60_000) for r in ens.runners]
    start = time.monotonic()
    with pytest.raises(MemberLost, match="'m2'"):
        ens.generate(parse_combine("we:1,1,1", 3), [4, 4], cfg, method="ensemble", stop_member_after=0.5)
    assert time.monotonic() - start < 10


def test_a_member_that_joins_before_the_previous_request_ends_is_not_lost(paths):
    """Under load, a member's call for the next request can run while the leader's actor is
    still in the previous one: its handshake arrives on a link that does not know it. Dropped,
    leader and member each waited out the handshake timeout (a test saw the request after a
    cancelled one hang); kept for the next link, the next request just runs."""
    router, early = RouterChannel(ipc_endpoint(), config=CHANNEL), {}
    runners = [load_runner(p) for p in paths[:2]]
    cfg = DecodeConfig(max_new_tokens=8, eos_token_ids=(-1,))
    quick = PeerOptions(handshake_timeout_s=3, reply_timeout_s=10, idle_timeout_s=10)
    previous, following = new_session_id(), new_session_id()
    served = {}

    def serve():
        with DealerChannel(router.endpoint, config=CHANNEL) as dealer:
            served["stats"] = serve_member(runners[1], dealer, FINGERPRINT, following, 1, cfg, quick)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    # the previous request's link pumps the socket (its own member never comes: cancelled)
    stop_at = time.monotonic() + 1.0
    old = LeaderLink(router, FINGERPRINT, previous, {1: "m1"}, quick, alive=lambda i: True,
                     cancelled=lambda: time.monotonic() > stop_at, early=early)
    with pytest.raises(Cancelled):
        old.accept()
    assert list(early) == [f"{following}.1"]  # the next request's member, kept
    link = LeaderLink(router, FINGERPRINT, following, {1: "m1"}, quick, alive=lambda i: thread.is_alive(),
                      cancelled=lambda: False, early=early)
    members = [LocalMember(runners[0], "m0", 0), RemoteMember(link, 1, "m1", following)]
    rule = parse_combine("we:0.5", 2)
    try:
        link.accept()
        got = ensemble_generate(members, rule, [5, 6], cfg).token_ids
    finally:
        link.close("done")
        thread.join(10)
    assert got == ensemble_generate(local_members(runners), rule, [5, 6], cfg).token_ids
    assert served["stats"]["calls"] > 0 and not early
