"""Drafter here, verifier in another process, over tcp loopback and ipc."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import zmq

from protocol import (
    PROTOCOL_VERSION,
    CandidateTree,
    ChannelConfig,
    ContextUpdate,
    DealerChannel,
    Error,
    ErrorCode,
    Handshake,
    HandshakeRefused,
    ModelFingerprint,
    ReceiveTimeout,
    Role,
    Shutdown,
    Verdict,
    decode,
    ipc_endpoint,
)

PEER_SCRIPT = pathlib.Path(__file__).with_name("peer_process.py")
FINGERPRINT = ModelFingerprint(vocab_size=1000, tokenizer_hash="ab" * 32)


def random_tree(rng, session, step, n, probs_shape):
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    probs = None if probs_shape is None else np.full(probs_shape, 0.25, np.float32)
    return CandidateTree(session_id=session, step=step, token_ids=rng.integers(0, 1000, n),
                         parents=parents, draft_probs=probs)


def expected_path(tree, max_depth=3):
    path, node = [], 0
    while len(path) < max_depth:
        children = [c for c, p in enumerate(tree.parents) if p == node]
        if not children:
            break
        node = children[0]
        path.append(node)
    return path


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_two_processes(transport, tmp_path):
    bind = "tcp://127.0.0.1:*" if transport == "tcp" else ipc_endpoint("peer", str(tmp_path))
    peer = subprocess.Popen([sys.executable, str(PEER_SCRIPT), bind], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = json.loads(peer.stdout.readline())["endpoint"]
        assert endpoint.startswith(transport)
        config = ChannelConfig(recv_timeout_s=20, send_timeout_s=20, linger_s=2)
        rng = np.random.default_rng(0)
        with DealerChannel(endpoint, config=config) as drafter:
            # Wrong model: refused at connect time.
            with pytest.raises(HandshakeRefused):
                drafter.handshake(Handshake(session_id="bad", step=0, role=Role.DRAFTER,
                                            fingerprint=ModelFingerprint(vocab_size=999, tokenizer_hash="x")))
            answer = drafter.handshake(Handshake(session_id="s", step=0, role=Role.DRAFTER, fingerprint=FINGERPRINT))
            assert answer.role is Role.VERIFIER
            drafter.send(ContextUpdate(session_id="s", step=1, token_ids=list(range(20)), position=0, is_prompt=True))

            committed = 20
            large_tensors = 0
            for step in range(1, 31):
                n = int(rng.integers(1, 65))
                shape = [None, (n,), (n, 8), (n, 70_000)][step % 4]  # (n, 70000) float32 >= 64 KiB
                large_tensors += shape is not None and len(shape) == 2 and shape[1] == 70_000
                tree = random_tree(rng, "s", step, n, shape)
                verdict = drafter.request(tree)
                path = expected_path(tree)
                committed += len(path) + 1
                assert isinstance(verdict, Verdict) and verdict.step == step
                assert list(verdict.accepted_path) == path
                assert verdict.committed_length == committed
                checksum = 0 if shape is None else round(0.25 * np.prod(shape))
                assert verdict.bonus_token_id == checksum % 1000
                hidden = np.asarray(verdict.hidden)
                assert hidden.shape == (20_000 if step % 2 else 1536,) and bool((hidden == step).all())

            # A stale step is dropped by the verifier (no answer), the next one served.
            drafter.send(random_tree(rng, "s", 5, 4, None))
            with pytest.raises(ReceiveTimeout):
                drafter.recv(timeout_s=0.3)

            # Garbage from another socket gets a typed Error back; the verifier keeps serving.
            raw = zmq.Context.instance().socket(zmq.DEALER)
            raw.linger = 0
            raw.connect(endpoint)
            # a CandidateTree of this version whose parents (0, 5) are no tree
            body = b"\x03\xa1s\x00\x95\x92\x01\x02\x92\x00\x05\xc0\xc0\xc0\x90"
            raw.send_multipart([bytes([0x96, PROTOCOL_VERSION]) + body])
            assert raw.poll(20_000)
            error = decode(raw.recv_multipart())
            assert isinstance(error, Error) and error.code == ErrorCode.INVALID_TREE
            raw.close()
            assert drafter.request(random_tree(rng, "s", 40, 3, None)).step == 40

            drafter.send(Shutdown(session_id="s", step=41, reason="test done"))
        stats = json.loads(peer.stdout.readline())
        assert peer.wait(timeout=20) == 0
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    assert stats["trees"] == 31
    assert stats["zero_copy_tensors"] == large_tensors > 0 and stats["copied_tensors"] == 0
    assert stats["dropped_stale_step"] == 1
    assert stats["protocol_errors"] == 1
