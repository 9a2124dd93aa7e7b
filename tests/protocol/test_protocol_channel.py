"""Channels in one process: handshake, admission, bad input, back-pressure, auth."""

import gc
import secrets
import threading
import time

import numpy as np
import pytest
import zmq

from protocol import (
    PROTOCOL_VERSION,
    AuthenticationError,
    Backpressure,
    CandidateTree,
    ChannelConfig,
    CurveClient,
    CurveKeypair,
    CurveServer,
    DealerChannel,
    Error,
    ErrorCode,
    Handshake,
    HandshakeRefused,
    InvalidTree,
    MalformedMessage,
    ModelFingerprint,
    PeerUnreachable,
    ReceiveTimeout,
    Role,
    RouterChannel,
    SharedSecret,
    Shutdown,
    Verdict,
    bind_endpoint,
    decode,
    describe_link,
    ipc_endpoint,
    is_zero_copy,
    link_auth,
    owning_frame,
)

FP = ModelFingerprint(vocab_size=1000, tokenizer_hash="ab" * 32)
FAST = ChannelConfig(recv_timeout_s=2.0, send_timeout_s=2.0, linger_s=0)


def hello(session="s1", fingerprint=FP, role=Role.DRAFTER):
    return Handshake(session_id=session, step=0, role=role, fingerprint=fingerprint)


def tree(session="s1", step=1, probs=None):
    return CandidateTree(session_id=session, step=step, token_ids=[5, 6, 7], parents=[-1, 0, 1], draft_probs=probs)


def verdict_for(message):
    return Verdict(session_id=message.session_id, step=message.step, accepted_path=[1],
                   bonus_token_id=sum(message.token_ids) % 1000, committed_length=10 + message.step)


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request, tmp_path):
    return "tcp://127.0.0.1:*" if request.param == "tcp" else ipc_endpoint("t", str(tmp_path))


@pytest.fixture
def pair(endpoint):
    router = RouterChannel(endpoint, config=FAST)
    dealer = DealerChannel(router.endpoint, config=FAST)
    yield router, dealer
    dealer.close()
    router.close()


def open_session(router, dealer, session="s1"):
    """Handshake without a serve loop: dealer sends, router answers."""
    dealer.sessions.open(session)
    dealer.send(hello(session))
    peer, message = router.recv()
    assert router.answer_handshake(peer, message, role=Role.VERIFIER, fingerprint=FP)
    assert isinstance(dealer.recv(), Handshake)
    return peer


@pytest.fixture
def served(endpoint):
    """A RouterChannel serving verdicts in a thread; yields its endpoint and the channel."""
    router = RouterChannel(endpoint, config=FAST)
    stop = threading.Event()

    def handler(peer, message):
        if isinstance(message, CandidateTree) and message.step == 13:
            raise InvalidTree("the application found this tree inconsistent")
        if isinstance(message, CandidateTree):
            return verdict_for(message)
        return None

    thread = threading.Thread(target=router.serve, args=(handler,),
                              kwargs=dict(role=Role.VERIFIER, fingerprint=FP, should_stop=stop.is_set, poll_s=0.02))
    thread.start()
    yield router
    stop.set()
    thread.join(5)
    router.close()


def test_handshake_then_tree_and_verdict(served):
    with DealerChannel(served.endpoint, config=FAST) as dealer:
        answer = dealer.handshake(hello())
        assert answer.role is Role.VERIFIER and answer.fingerprint == FP
        for step in range(1, 13):
            reply = dealer.request(tree(step=step))
            assert isinstance(reply, Verdict) and reply.step == step and reply.bonus_token_id == 18


def test_handler_errors_are_reported_to_the_peer_and_serving_goes_on(served):
    with DealerChannel(served.endpoint, config=FAST) as dealer:
        dealer.handshake(hello())
        reply = dealer.request(tree(step=13))
        assert isinstance(reply, Error) and reply.code == ErrorCode.INVALID_TREE
        assert (reply.session_id, reply.step) == ("s1", 13)
        assert isinstance(reply.to_exception(), InvalidTree)
        assert dealer.request(tree(step=14)).step == 14
    assert served.stats.handler_errors == 1


def test_mismatched_peers_are_refused_at_connect_time(served):
    with DealerChannel(served.endpoint, config=FAST) as dealer:
        other_model = ModelFingerprint(vocab_size=1001, tokenizer_hash=FP.tokenizer_hash)
        with pytest.raises(HandshakeRefused, match="fingerprint"):
            dealer.handshake(hello(fingerprint=other_model))
        with pytest.raises(HandshakeRefused, match="role"):
            dealer.handshake(hello(session="s2", role=Role.VERIFIER))
        assert "s1" not in dealer.sessions and "s2" not in dealer.sessions
        # Not opened on the server either: a tree for the refused session is dropped.
        dealer.sessions.open("s1")
        dealer.send(tree())
        with pytest.raises(ReceiveTimeout):
            dealer.recv(timeout_s=0.2)
    assert served.stats.handshakes_refused == 2
    assert served.stats.dropped_unknown_session == 1


def test_receive_loop_keeps_serving_after_bad_frames(served):
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(served.endpoint)
    ours, other = bytes([PROTOCOL_VERSION]), bytes([PROTOCOL_VERSION + 1])
    garbage = [[b"\xc1\xc1"], [b"not msgpack at all"], [b"\x96" + ours + b"\x63\xa1s\x00\x90\x90"],  # type 99
               [b"\x96" + other + b"\x01\xa1s\x00\x90\x90"]]  # another version
    expected = [ErrorCode.MALFORMED, ErrorCode.MALFORMED, ErrorCode.UNKNOWN_MESSAGE_TYPE, ErrorCode.VERSION_MISMATCH]
    with DealerChannel(served.endpoint, config=FAST) as dealer:
        dealer.handshake(hello())
        for frames, code in zip(garbage, expected):
            raw.send_multipart(frames)
            assert raw.poll(2000), "server stopped answering"
            reply = decode(raw.recv_multipart())
            assert isinstance(reply, Error) and reply.code == code
            assert dealer.request(tree(step=5)).step == 5  # the loop still serves
    raw.close()
    assert served.stats.protocol_errors == 4


def test_unknown_session_and_stale_steps_are_dropped_and_counted(pair):
    router, dealer = pair
    open_session(router, dealer)
    dealer.sessions.open("intruder")
    dealer.send(tree(session="intruder", step=1))  # never handshaked
    dealer.send(tree(step=5))
    dealer.send(tree(step=3))  # older than 5: stale
    dealer.send(tree(step=5))  # same step is fine (e.g. context update then tree)
    dealer.send(tree(step=6))
    received = [router.recv()[1].step for _ in range(3)]
    assert received == [5, 5, 6]
    with pytest.raises(ReceiveTimeout):
        router.recv(timeout_s=0.1)
    assert router.stats.dropped_unknown_session == 1
    assert router.stats.dropped_stale_step == 1


def test_shutdown_closes_the_session(pair):
    router, dealer = pair
    open_session(router, dealer)
    dealer.send(Shutdown(session_id="s1", step=2, reason="done"))
    dealer.send(tree(step=3))
    assert isinstance(router.recv()[1], Shutdown)
    with pytest.raises(ReceiveTimeout):
        router.recv(timeout_s=0.1)
    assert router.stats.dropped_unknown_session == 1


def test_session_is_bound_to_the_peer_that_opened_it(pair):
    router, dealer = pair
    open_session(router, dealer)
    with DealerChannel(router.endpoint, config=FAST) as other:
        other.sessions.open("s1")
        other.send(tree(step=9))
        other.send(hello())  # and it may not take the session over
        peer, message = router.recv()
        assert isinstance(message, Handshake)
        assert not router.answer_handshake(peer, message, role=Role.VERIFIER, fingerprint=FP)
        with pytest.raises(HandshakeRefused):
            other._check_handshake_reply(hello(), other.recv())
    assert router.stats.dropped_unknown_session == 1


def test_receive_timeout_is_typed_and_a_timeout_error(pair):
    router, dealer = pair
    started = time.monotonic()
    with pytest.raises(ReceiveTimeout):
        dealer.recv(timeout_s=0.05)
    with pytest.raises(TimeoutError):
        router.recv(timeout_s=0)
    assert time.monotonic() - started < 1.5


def test_a_receive_gives_up_once_its_peer_is_known_gone(pair):
    """`alive` says the peer's process is gone: PeerUnreachable, not a wait for the timeout;
    while it says alive the wait lasts the timeout."""
    router, dealer = pair
    asked = []

    def alive() -> bool:
        asked.append(1)
        return len(asked) < 3

    with pytest.raises(PeerUnreachable):
        dealer.recv(timeout_s=600, alive=alive)
    assert len(asked) == 3
    with pytest.raises(ReceiveTimeout):
        dealer.recv(timeout_s=0.6, alive=lambda: True)


def test_router_raises_typed_error_with_peer_and_keeps_receiving(pair):
    router, dealer = pair
    peer = open_session(router, dealer)
    dealer._socket.send_multipart([b"\x93\x01\x03"])  # truncated header
    with pytest.raises(MalformedMessage) as caught:
        router.recv()
    assert caught.value.peer == peer
    dealer.send(tree(step=2))
    assert router.recv()[1].step == 2


def test_replying_to_a_vanished_peer_raises(pair):
    router, _ = pair
    with pytest.raises(PeerUnreachable):
        router.send(b"nobody", Shutdown(session_id="s1", step=0))


def test_high_water_marks_apply_back_pressure(endpoint):
    small_queues = ChannelConfig(send_hwm=1, recv_hwm=1, send_timeout_s=0.2, recv_timeout_s=2, linger_s=0)
    probs = np.zeros((4, 256 * 1024), np.float32)  # 4 MiB per message
    with RouterChannel(endpoint, config=small_queues) as router, \
            DealerChannel(router.endpoint, config=small_queues) as dealer:
        with pytest.raises(Backpressure):
            for step in range(100):  # a few fill the queues and socket buffers, then send waits
                dealer.send(CandidateTree(session_id="s", step=step, token_ids=[1] * 4,
                                          parents=[-1, 0, 0, 0], draft_probs=probs))
        assert step < 50


def test_wildcard_bind_is_refused():
    with pytest.raises(ValueError, match="all interfaces"):
        RouterChannel("tcp://*:0", config=FAST)
    with pytest.raises(ValueError, match="all interfaces"):
        RouterChannel("tcp://0.0.0.0:0", config=FAST)


def test_the_ipc_directory_must_be_this_users_own(monkeypatch):
    """Someone else's directory, or a symlink planted where ours would be, is refused by name
    (a socket there could be reached by its owner); ours is tightened to 0700."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from protocol import endpoints

    tmp_path = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # short: a socket path has ~100 bytes
    monkeypatch.setattr(endpoints.tempfile, "gettempdir", lambda: str(tmp_path))
    ours = tmp_path / f"specray-{os.getuid()}"
    try:
        (tmp_path / "elsewhere").mkdir()
        ours.symlink_to(tmp_path / "elsewhere")
        with pytest.raises(PermissionError, match="symlink"):
            ipc_endpoint("a")
        ours.unlink()
        ours.mkdir(mode=0o777)
        os.chmod(ours, 0o777)
        assert ipc_endpoint("a").startswith(f"ipc://{ours}/") and (os.stat(ours).st_mode & 0o777) == 0o700
    finally:
        shutil.rmtree(tmp_path)


def test_bind_endpoint_picks_ipc_on_one_node_and_tcp_on_own_address():
    assert bind_endpoint("10.0.0.5", "10.0.0.5", name="a").startswith("ipc://")
    assert bind_endpoint("10.0.0.5", "10.0.0.6") == "tcp://10.0.0.5:*"
    assert bind_endpoint("10.0.0.5", "10.0.0.6", port=5555) == "tcp://10.0.0.5:5555"


def test_tensor_is_received_without_a_copy_and_kept_alive_until_sent(pair):
    router, dealer = pair
    open_session(router, dealer)
    rows, cols = 64, 64 * 1024  # 16 MiB
    dealer.send(CandidateTree(session_id="s1", step=1, token_ids=[1] * rows, parents=[-1] + [0] * (rows - 1),
                              draft_probs=np.full((rows, cols), 0.5, np.float32)))
    gc.collect()  # the sender dropped its array; zmq must still hold it
    _, received = router.recv()
    probs = received.draft_probs
    frame = owning_frame(probs)
    assert isinstance(frame, zmq.Frame) and len(frame) == rows * cols * 4
    assert is_zero_copy(probs, frame)
    assert probs.shape == (rows, cols) and float(probs[-1, -1]) == 0.5 and float(probs.sum()) == rows * cols / 2


def test_torch_channel_yields_tensors(endpoint):
    torch_config = ChannelConfig(recv_timeout_s=2, linger_s=0, tensor_lib="torch")
    import torch

    with RouterChannel(endpoint, config=torch_config) as router, DealerChannel(router.endpoint, config=FAST) as dealer:
        open_session(router, dealer)
        dealer.send(tree(probs=np.ones((3, 30000), np.float32)))
        probs = router.recv()[1].draft_probs
        assert isinstance(probs, torch.Tensor) and probs.shape == (3, 30000) and probs.sum().item() == 90000


def test_shared_secret_authenticates_messages():
    secret = SharedSecret.generate()
    signed = ChannelConfig(recv_timeout_s=2, linger_s=0, auth=secret)
    with RouterChannel("tcp://127.0.0.1:*", config=signed) as router:
        with DealerChannel(router.endpoint, config=signed) as dealer:
            open_session(router, dealer)
            dealer.send(tree(step=1))
            assert router.recv()[1].step == 1
        forged = ChannelConfig(recv_timeout_s=2, linger_s=0, auth=SharedSecret.generate())
        with DealerChannel(router.endpoint, config=forged) as intruder:
            intruder.send(hello("s9"))
            with pytest.raises(AuthenticationError):
                router.recv()
        with DealerChannel(router.endpoint, config=FAST) as unsigned:
            unsigned.send(hello("s9"))
            with pytest.raises(AuthenticationError):
                router.recv()
    assert "redacted" in repr(secret)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_admits_allowed_clients_only():
    server_keys, client_keys, stranger_keys = CurveKeypair.generate(), CurveKeypair.generate(), CurveKeypair.generate()
    server_config = ChannelConfig(recv_timeout_s=2, linger_s=0,
                                  auth=CurveServer(server_keys, allowed_clients=[client_keys.public]))
    with RouterChannel("tcp://127.0.0.1:*", config=server_config) as router:
        stop = threading.Event()
        thread = threading.Thread(target=router.serve, args=(lambda peer, m: verdict_for(m),),
                                  kwargs=dict(role=Role.VERIFIER, fingerprint=FP, should_stop=stop.is_set, poll_s=0.02))
        thread.start()
        try:
            ok = ChannelConfig(recv_timeout_s=2, linger_s=0, auth=CurveClient(client_keys, server_keys.public))
            with DealerChannel(router.endpoint, config=ok) as dealer:
                dealer.handshake(hello())
                assert dealer.request(tree(step=1)).bonus_token_id == 18
            for keys in (stranger_keys, client_keys):  # not on the list / wrong server key
                server_public = server_keys.public if keys is stranger_keys else stranger_keys.public
                bad = ChannelConfig(recv_timeout_s=0.3, linger_s=0, auth=CurveClient(keys, server_public))
                with DealerChannel(router.endpoint, config=bad) as dealer:
                    # refused by CURVE, the connection never completes: the hello either waits in
                    # the queue (no answer) or finds no peer to queue for (send times out)
                    with pytest.raises((ReceiveTimeout, Backpressure)):
                        dealer.handshake(hello(session=f"x{keys.public[:4]!r}"))
        finally:
            stop.set()
            thread.join(5)
    with pytest.raises(ValueError):
        DealerChannel("tcp://127.0.0.1:1", config=server_config)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_allow_any_server_next_to_an_allow_list_server():
    """Two CURVE servers on one context (one ZAP handler): each keeps its own policy."""
    listed_keys, open_keys, client_keys = CurveKeypair.generate(), CurveKeypair.generate(), CurveKeypair.generate()
    listed = RouterChannel("tcp://127.0.0.1:*", config=ChannelConfig(
        recv_timeout_s=2, linger_s=0, auth=CurveServer(listed_keys, allowed_clients=[b"x" * 40])))
    open_to_all = RouterChannel("tcp://127.0.0.1:*", config=ChannelConfig(
        recv_timeout_s=2, linger_s=0, auth=CurveServer(open_keys)))
    stop = threading.Event()
    servers = [threading.Thread(target=router.serve, args=(lambda peer, message: verdict_for(message),),
                                kwargs=dict(role=Role.VERIFIER, fingerprint=FP, should_stop=stop.is_set, poll_s=0.02))
               for router in (listed, open_to_all)]
    for server in servers:
        server.start()
    try:
        ok = DealerChannel(open_to_all.endpoint, config=ChannelConfig(
            recv_timeout_s=2, linger_s=0, auth=CurveClient(client_keys, open_keys.public)))
        ok.handshake(hello())
        assert ok.request(tree(step=1)).step == 1
        ok.close()
        refused = DealerChannel(listed.endpoint, config=ChannelConfig(
            recv_timeout_s=0.3, linger_s=0, auth=CurveClient(client_keys, listed_keys.public)))
        with pytest.raises(ReceiveTimeout):
            refused.handshake(hello())
        refused.close()
    finally:
        stop.set()
        for server in servers:
            server.join(5)
        listed.close()
        open_to_all.close()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_actor_links_refuse_a_peer_without_the_secret_before_reading_it():
    """link_auth: both ends derive CURVE keys from the pipeline's secret; a peer with another
    secret, or none, never completes the handshake, so nothing of it is buffered or decoded."""
    secret = secrets.token_hex(32)
    server = link_auth("tcp://127.0.0.1:*", secret, binds=True)
    assert isinstance(server, CurveServer) and len(server.allowed_clients) == 1
    with RouterChannel("tcp://127.0.0.1:*", config=ChannelConfig(recv_timeout_s=2, linger_s=0, auth=server)) as router:
        stop = threading.Event()
        thread = threading.Thread(target=router.serve, args=(lambda peer, m: verdict_for(m),),
                                  kwargs=dict(role=Role.VERIFIER, fingerprint=FP, should_stop=stop.is_set, poll_s=0.02))
        thread.start()
        try:
            client = link_auth(router.endpoint, secret, binds=False)
            with DealerChannel(router.endpoint, config=ChannelConfig(recv_timeout_s=2, linger_s=0, auth=client)) as ok:
                ok.handshake(hello())
                assert ok.request(tree(step=1)).bonus_token_id == 18
            received = router.stats.bytes_received
            knows_public_key = CurveClient(CurveKeypair.generate(), server.keypair.public)  # public keys leak
            for auth in (link_auth(router.endpoint, secrets.token_hex(32), binds=False), knows_public_key, None):
                config = ChannelConfig(recv_timeout_s=0.3, send_timeout_s=0.3, linger_s=0, auth=auth)
                with DealerChannel(router.endpoint, config=config) as stranger:
                    with pytest.raises((ReceiveTimeout, Backpressure)):
                        stranger.handshake(hello(session="stranger"))
            assert router.stats.bytes_received == received and router.stats.protocol_errors == 0
        finally:
            stop.set()
            thread.join(5)


def test_actor_links_sign_messages_where_libzmq_has_no_curve(monkeypatch):
    secret = secrets.token_hex(32)
    assert link_auth("ipc:///tmp/x", secret, binds=True) is None  # same node: a private directory
    assert link_auth("tcp://127.0.0.1:5555", None, binds=True) is None
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    signed = link_auth("tcp://127.0.0.1:5555", secret, binds=True)
    assert signed == link_auth("tcp://127.0.0.1:5555", secret, binds=False) == SharedSecret(bytes.fromhex(secret))
    assert describe_link("tcp://127.0.0.1:5555", signed) == {"endpoint": "tcp://127.0.0.1:5555", "auth": "hmac-sha256"}


def test_a_link_says_how_it_authenticates_and_never_its_key():
    secret = secrets.token_hex(32)
    for binds in (True, False):
        described = describe_link("tcp://10.0.0.2:5555", link_auth("tcp://10.0.0.2:5555", secret, binds=binds))
        assert described["auth"] == ("curve" if zmq.has("curve") else "hmac-sha256")
        assert secret not in repr(described)
    assert describe_link("ipc:///tmp/d/x", None)["auth"] == "private ipc directory"
    assert describe_link("tcp://10.0.0.2:5555", None)["auth"] == "none"


def test_a_binding_socket_queues_fewer_messages_per_peer():
    """A binding socket's memory is shared by all its peers: its receive queue is shorter."""
    with RouterChannel("tcp://127.0.0.1:*", config=FAST) as router:
        with DealerChannel(router.endpoint, config=FAST) as dealer:
            assert router._socket.rcvhwm == 16 and dealer._socket.rcvhwm == 64
    with RouterChannel("tcp://127.0.0.1:*", config=ChannelConfig(recv_hwm=4, linger_s=0)) as router:
        assert router._socket.rcvhwm == 4
