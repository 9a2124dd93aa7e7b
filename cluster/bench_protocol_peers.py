"""The peers `specray bench-protocol` measures, each behind the same two calls (a tree's
round trip, a window of trees): a verifier process over our channels (tcp, ipc, with or
without link authentication), bare pyzmq with the same bytes, and a Ray actor.

Kept apart from the stages so that what each method does per message is in one place and
plainly the same work: the verifier processes are spawned (no Ray, no torch imported) and
check, as they receive them, that large tensors are decoded without a copy.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import zmq

from protocol import (
    CandidateTree,
    ChannelConfig,
    DealerChannel,
    Handshake,
    ModelFingerprint,
    Role,
    RouterChannel,
    SharedSecret,
    Shutdown,
    Verdict,
    encode,
    ipc_endpoint,
    is_zero_copy,
    link_auth,
    owning_frame,
)
from protocol.codec import buffer_address_range

TREE_NODES = 64
MiB = 1024 * 1024
WINDOW = 4  # messages in flight in the throughput stages, for every method
FINGERPRINT = ModelFingerprint(vocab_size=151936, tokenizer_hash="bench" * 8)
SESSION = "bench"


def tree_parents(n: int) -> list[int]:
    return [-1] + [(i - 1) // 2 for i in range(1, n)]  # binary tree: a few branches per depth


def make_tree(step: int, token_ids: np.ndarray, parents: list[int], probs: np.ndarray | None = None) -> CandidateTree:
    return CandidateTree(session_id=SESSION, step=step, token_ids=token_ids, parents=parents, draft_probs=probs)


def verdict_for(tree: CandidateTree) -> Verdict:
    # What a verifier sends back: the path it accepted, the bonus token, the new length.
    return Verdict(session_id=tree.session_id, step=tree.step, accepted_path=(1, 3, 7),
                   bonus_token_id=tree.token_ids[-1], committed_length=100 + tree.step)


# ---------------------------------------------------------------------------------------------
# verifier process (spawned; no Ray, no torch)


def link_config(auth: str, secret: str, binds: bool, **kw) -> ChannelConfig:
    """`auth`: "none", "hmac" (SharedSecret) or "curve" (link_auth's derived keys)."""
    if auth == "hmac":
        return ChannelConfig(auth=SharedSecret(bytes.fromhex(secret)), **kw)
    if auth == "curve":
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE")
        return ChannelConfig(auth=link_auth("tcp://", secret, binds=binds), **kw)
    return ChannelConfig(**kw)


def _verifier_main(bind: str, conn, auth: str = "none", secret: str = "") -> None:
    router = RouterChannel(bind, config=link_config(auth, secret, True, recv_timeout_s=60, send_timeout_s=60,
                                                    linger_s=2))
    conn.send(router.endpoint)
    evidence = {"tensors_checked": 0, "tensors_zero_copy": 0, "example_16MiB": None}
    done = False

    def handle(peer, message):
        nonlocal done
        if isinstance(message, CandidateTree):
            probs = message.draft_probs
            if probs is not None and probs.nbytes >= 64 * 1024:
                frame = owning_frame(probs)
                zero_copy = frame is not None and is_zero_copy(probs, frame)
                evidence["tensors_checked"] += 1
                evidence["tensors_zero_copy"] += zero_copy
                if probs.nbytes == 16 * MiB and evidence["example_16MiB"] is None:
                    start, end = buffer_address_range(frame)
                    evidence["example_16MiB"] = {
                        "frame_type": type(frame).__name__,
                        "frame_buffer": [hex(start), hex(end)],
                        "array_data": hex(probs.__array_interface__["data"][0]),
                        "array_owns_data": bool(probs.flags.owndata),
                        "shares_memory_with_frame": bool(np.shares_memory(probs,
                                                                          np.frombuffer(frame.buffer, np.uint8))),
                    }
            return verdict_for(message)
        if isinstance(message, Shutdown):
            done = True
        return None

    router.serve(handle, role=Role.VERIFIER, fingerprint=FINGERPRINT, should_stop=lambda: done, poll_s=0.05)
    conn.send(evidence)
    router.close()


class ZmqPeer:
    """A verifier process and this process's DealerChannel to it."""

    def __init__(self, transport: str, auth: str = "none") -> None:
        bind = "tcp://127.0.0.1:*" if transport == "tcp" else ipc_endpoint(f"bench-{os.getpid()}")
        secret = os.urandom(32).hex()
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_verifier_main, args=(bind, child_conn, auth, secret), daemon=True)
        self._process.start()
        endpoint = self._conn.recv()
        self.channel = DealerChannel(endpoint, config=link_config(auth, secret, False, recv_timeout_s=60,
                                                                  send_timeout_s=60))
        self.channel.handshake(Handshake(session_id=SESSION, step=0, role=Role.DRAFTER, fingerprint=FINGERPRINT))

    def tree_round_trip(self, step: int, token_ids: np.ndarray, parents: list[int]) -> int:
        # Build, encode, send; the verifier decodes, checks, answers; decode the verdict.
        return self.channel.request(make_tree(step, token_ids, parents)).bonus_token_id

    def windowed(self, trees: list[CandidateTree]) -> None:
        in_flight = 0
        for tree in trees:
            if in_flight == WINDOW:
                self.channel.recv()
                in_flight -= 1
            self.channel.send(tree)
            in_flight += 1
        for _ in range(in_flight):
            self.channel.recv()

    def close(self) -> dict:
        self.channel.send(Shutdown(session_id=SESSION, step=2**40, reason="benchmark done"))
        evidence = self._conn.recv() if self._conn.poll(30) else {}
        self.channel.close()
        self._process.join(10)
        return evidence


def _raw_echo_main(conn) -> None:
    """Bare pyzmq ROUTER answering each message with fixed bytes: the transport's floor."""
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.bind("tcp://127.0.0.1:*")
    conn.send(socket.getsockopt_string(zmq.LAST_ENDPOINT))
    reply = conn.recv()
    while True:
        peer, payload = socket.recv_multipart(copy=False)
        if payload.bytes == b"stop":
            break
        socket.send_multipart([peer, reply])
    socket.close()


class RawZmqPeer:
    """Same bytes as a tree and its verdict over bare pyzmq (tcp), no protocol code at all."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_raw_echo_main, args=(child_conn,), daemon=True)
        self._process.start()
        tree = make_tree(1, np.zeros(TREE_NODES, np.int64), tree_parents(TREE_NODES))
        self._request = bytes(encode(tree)[0])
        self._conn.send(bytes(encode(verdict_for(tree))[0]))
        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.connect(self._conn.recv())

    def tree_round_trip(self, step: int, token_ids: np.ndarray, parents: list[int]) -> int:
        self._socket.send(self._request)
        self._socket.recv()
        return 0

    def close(self) -> dict:
        self._socket.send(b"stop")
        self._process.join(10)
        self._socket.close(linger=0)
        return {}


# ---------------------------------------------------------------------------------------------
# Ray comparison


class RayPeer:
    """The same payloads as arguments of a Ray actor method call, answered by its return."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
        ray.init(num_cpus=2, object_store_memory=300 * MiB, include_dashboard=False,
                 logging_level="warning", log_to_driver=False)

        @ray.remote(num_cpus=1)
        class Verifier:
            def verify(self, tree):
                return verdict_for(tree)

        self._actor = Verifier.remote()
        ray.get(self._actor.verify.remote(make_tree(0, np.zeros(2, np.int64), [-1, 0])))  # actor up

    def tree_round_trip(self, step: int, token_ids: np.ndarray, parents: list[int]) -> int:
        return self._ray.get(self._actor.verify.remote(make_tree(step, token_ids, parents))).bonus_token_id

    def windowed(self, trees: list[CandidateTree]) -> None:
        pending = []
        for tree in trees:
            if len(pending) == WINDOW:
                self._ray.get(pending.pop(0))
            pending.append(self._actor.verify.remote(tree))
        self._ray.get(pending)

    def close(self) -> dict:
        self._ray.shutdown()
        return {}
