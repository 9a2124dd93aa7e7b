"""`specray bench-protocol [--json]`: the wire protocol against a Ray actor call.

In one run, interleaved round by round so that load from other jobs hits every method alike:
  * round trip of a 64-node candidate tree and its verdict, over tcp loopback and ipc, each
    to a verifier in another process; the same payload through a Ray actor method call;
  * throughput of 1 MiB and 16 MiB draft-probability tensors (a 64-node tree with a
    [64, V] float32 tensor), windowed, over tcp, ipc and Ray;
  * the same over tcp with the authentication links between nodes use: HMAC signatures
    (`tcp_hmac`) and CURVE keys derived from a shared secret (`tcp_curve`, protocol.link_auth);
  * evidence that a 16 MiB tensor frame is received without a copy: the verifier checks that
    every decoded tensor's memory lies inside the zmq.Frame it arrived in, and decoding a
    16 MiB message is timed against one 16 MiB memcpy.

Progress goes to stderr, one line per stage. With --json, stdout's last line is one JSON object
(`tree_roundtrip_p50_us` and `ray_call_p50_us` are the tcp and Ray figures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import sys
import time

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
    decode,
    encode,
    ipc_endpoint,
    is_zero_copy,
    link_auth,
    owning_frame,
)
from protocol.codec import buffer_address_range

TREE_NODES = 64
MiB = 1024 * 1024
TENSOR_SIZES = {"1MiB": 1 * MiB, "16MiB": 16 * MiB}
WINDOW = 4  # messages in flight in the throughput stages, for every method
FINGERPRINT = ModelFingerprint(vocab_size=151936, tokenizer_hash="bench" * 8)
SESSION = "bench"
# Steps only move forward within a session (older ones are dropped as stale): one counter.
_steps = itertools.count(1)


def progress(text: str) -> None:
    print(f"[bench-protocol] {text}", file=sys.stderr, flush=True)


def tree_parents(n: int) -> list[int]:
    return [-1] + [(i - 1) // 2 for i in range(1, n)]  # binary tree: a few branches per depth


def make_tree(step: int, token_ids: np.ndarray, parents: list[int], probs: np.ndarray | None = None) -> CandidateTree:
    return CandidateTree(session_id=SESSION, step=step, token_ids=token_ids, parents=parents, draft_probs=probs)


def verdict_for(tree: CandidateTree) -> Verdict:
    # What a verifier sends back: the path it accepted, the bonus token, the new length.
    return Verdict(session_id=tree.session_id, step=tree.step, accepted_path=(1, 3, 7),
                   bonus_token_id=tree.token_ids[-1], committed_length=100 + tree.step)


def percentiles_us(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1e6
    return {"p50_us": round(float(np.percentile(values, 50)), 1),
            "p99_us": round(float(np.percentile(values, 99)), 1),
            "n": len(values)}


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


# ---------------------------------------------------------------------------------------------
# stages


def measure_tree_round_trips(peers: dict, rounds: int, iterations: dict[str, int]) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, FINGERPRINT.vocab_size, TREE_NODES).astype(np.int64)
    parents = tree_parents(TREE_NODES)
    samples: dict[str, list[float]] = {name: [] for name in peers}
    for name, peer in peers.items():  # warm up every path (connections, caches, actor)
        for _ in range(50):
            peer.tree_round_trip(next(_steps), token_ids, parents)
    for round_index in range(rounds):
        for name, peer in peers.items():
            timings = samples[name]
            for _ in range(iterations[name]):
                step = next(_steps)
                started = time.perf_counter()
                bonus = peer.tree_round_trip(step, token_ids, parents)
                timings.append(time.perf_counter() - started)
            assert name == "raw_zmq" or bonus == int(token_ids[-1])
        progress(f"tree round trip, round {round_index + 1}/{rounds}: " + ", ".join(
            f"{name} p50 {np.percentile(samples[name], 50) * 1e6:.0f} us" for name in peers))
    return samples


def measure_throughput(peers: dict, size: int, rounds: int, messages: int) -> dict[str, dict]:
    vocab = size // (TREE_NODES * 4)
    probs = np.random.default_rng(1).random((TREE_NODES, vocab), dtype=np.float32)
    token_ids = np.arange(TREE_NODES, dtype=np.int64)
    parents = tree_parents(TREE_NODES)
    elapsed = {name: 0.0 for name in peers}
    sent = {name: 0 for name in peers}
    for name, peer in peers.items():
        peer.windowed([make_tree(next(_steps), token_ids, parents, probs) for _ in range(2)])  # warm up
    for round_index in range(rounds):
        for name, peer in peers.items():
            trees = [make_tree(next(_steps), token_ids, parents, probs) for _ in range(messages)]
            started = time.perf_counter()
            peer.windowed(trees)
            elapsed[name] += time.perf_counter() - started
            sent[name] += messages
        progress(f"{size // MiB} MiB tensors, round {round_index + 1}/{rounds}: " + ", ".join(
            f"{name} {sent[name] * size / MiB / elapsed[name]:.0f} MiB/s" for name in peers))
    return {name: {"mib_per_s": round(sent[name] * size / MiB / elapsed[name], 1),
                   "ms_per_message": round(elapsed[name] / sent[name] * 1e3, 3),
                   "messages": sent[name]} for name in peers}


def measure_zero_copy_decode() -> dict:
    """Decode a received 16 MiB message and compare with one 16 MiB memcpy: a decode that
    copied could not be faster than the copy."""
    context = zmq.Context.instance()
    receiver, sender = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    endpoint = ipc_endpoint(f"bench-decode-{os.getpid()}")
    receiver.bind(endpoint)
    sender.connect(endpoint)
    probs = np.ones((TREE_NODES, 16 * MiB // (TREE_NODES * 4)), np.float32)
    sender.send_multipart(encode(make_tree(1, np.arange(TREE_NODES), tree_parents(TREE_NODES), probs)), copy=False)
    frames = receiver.recv_multipart(copy=False)
    decode_s, copy_s = [], []
    for _ in range(20):
        started = time.perf_counter()
        message = decode(frames)
        decode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        np.copy(message.draft_probs)
        copy_s.append(time.perf_counter() - started)
    zero_copy = is_zero_copy(message.draft_probs, frames[1]) and owning_frame(message.draft_probs) is frames[1]
    receiver.close(linger=0)
    sender.close(linger=0)
    return {"decode_16MiB_median_us": round(float(np.median(decode_s)) * 1e6, 1),
            "memcpy_16MiB_median_us": round(float(np.median(copy_s)) * 1e6, 1),
            "decoded_array_inside_received_frame": bool(zero_copy)}


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(), "curve": zmq.has("curve")}


def run(rounds: int, tree_iterations: int, ray_iterations: int, skip_ray: bool) -> dict:
    peers: dict = {}
    evidence: dict = {}
    try:
        if not skip_ray:
            progress("starting Ray (num_cpus=2, 300 MiB object store) and one verifier actor")
            peers["ray"] = RayPeer()
        for transport in ("tcp", "ipc"):
            progress(f"starting verifier process over {transport}")
            peers[transport] = ZmqPeer(transport)
        for auth in ("hmac", "curve") if zmq.has("curve") else ("hmac",):
            progress(f"starting verifier process over tcp, authenticated ({auth})")
            peers[f"tcp_{auth}"] = ZmqPeer("tcp", auth)
        progress("starting bare pyzmq echo process (tcp) for the transport's floor")
        peers["raw_zmq"] = RawZmqPeer()
        order = {name: peers[name] for name in ("tcp", "tcp_hmac", "tcp_curve", "ipc", "raw_zmq", "ray")
                 if name in peers}
        iterations = {name: ray_iterations if name == "ray" else tree_iterations for name in order}
        progress(f"64-node tree round trips: {rounds} interleaved rounds of {iterations}")
        trees = measure_tree_round_trips(order, rounds, iterations)
        throughput = {}
        bulk = {name: peer for name, peer in order.items() if name != "raw_zmq"}
        for label, size in TENSOR_SIZES.items():
            messages = 32 if size <= MiB else 8
            progress(f"{label} tensor throughput: {rounds} rounds of {messages} messages, window {WINDOW}")
            throughput[label] = measure_throughput(bulk, size, rounds, messages)
    finally:
        for name, peer in peers.items():
            evidence[name] = peer.close()
    progress("zero-copy decode check (16 MiB, ipc, this process)")
    decode_check = measure_zero_copy_decode()

    result: dict = {"machine": machine(), "tree_nodes": TREE_NODES, "window": WINDOW, "rounds": rounds}
    raw = percentiles_us(trees.pop("raw_zmq"))
    result["raw_zmq_tcp_roundtrip_p50_us"] = raw["p50_us"]
    result["raw_zmq_tcp_roundtrip_p99_us"] = raw["p99_us"]
    for name in bulk:
        stats = percentiles_us(trees[name])
        result[name] = {"tree_roundtrip_p50_us": stats["p50_us"], "tree_roundtrip_p99_us": stats["p99_us"],
                        "tree_roundtrips": stats["n"]}
        for label in TENSOR_SIZES:
            result[name][f"throughput_{label}_mib_per_s"] = throughput[label][name]["mib_per_s"]
            result[name][f"ms_per_{label}_message"] = throughput[label][name]["ms_per_message"]
    result["tree_roundtrip_p50_us"] = result["tcp"]["tree_roundtrip_p50_us"]
    result["tree_roundtrip_p99_us"] = result["tcp"]["tree_roundtrip_p99_us"]
    server_evidence = [evidence[t] for t in ("tcp", "ipc")]
    checked = sum(e.get("tensors_checked", 0) for e in server_evidence)
    zero_copied = sum(e.get("tensors_zero_copy", 0) for e in server_evidence)
    result["zero_copy"] = {
        "verifier_tensors_checked": checked,
        "verifier_tensors_inside_their_frame": zero_copied,
        "example_16MiB_tcp": evidence["tcp"].get("example_16MiB"),
        **decode_check,
    }
    targets = {
        "tree_p50_le_100us": result["tree_roundtrip_p50_us"] <= 100,
        "zero_copy_16MiB": (checked > 0 and zero_copied == checked
                            and decode_check["decoded_array_inside_received_frame"]),
    }
    if "ray" in result:
        result["ray_call_p50_us"] = result["ray"]["tree_roundtrip_p50_us"]
        result["ray_call_p99_us"] = result["ray"]["tree_roundtrip_p99_us"]
        result["speedup_vs_ray_p50"] = round(result["ray_call_p50_us"] / result["tree_roundtrip_p50_us"], 1)
        targets["ten_x_faster_than_ray"] = result["speedup_vs_ray_p50"] >= 10
    result["targets_met"] = targets
    return result


def print_table(result: dict) -> None:
    names = [name for name in ("tcp", "tcp_hmac", "tcp_curve", "ipc", "ray") if name in result]
    print(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
          f"libzmq {result['machine']['libzmq']}, pyzmq {result['machine']['pyzmq']}")
    print(f"{'':34}" + "".join(f"{name:>12}" for name in names))
    rows = [("64-node tree round trip p50 (us)", "tree_roundtrip_p50_us"),
            ("64-node tree round trip p99 (us)", "tree_roundtrip_p99_us")]
    rows += [(f"{label} tensors (MiB/s)", f"throughput_{label}_mib_per_s") for label in TENSOR_SIZES]
    rows += [(f"{label} tensors (ms/message)", f"ms_per_{label}_message") for label in TENSOR_SIZES]
    for title, key in rows:
        print(f"{title:34}" + "".join(f"{result[name][key]:>12}" for name in names))
    zero_copy = result["zero_copy"]
    print(f"zero copy: {zero_copy['verifier_tensors_inside_their_frame']}/{zero_copy['verifier_tensors_checked']} "
          f"received tensors lie inside their zmq.Frame; decoding 16 MiB takes "
          f"{zero_copy['decode_16MiB_median_us']} us vs {zero_copy['memcpy_16MiB_median_us']} us for one memcpy")
    if zero_copy.get("example_16MiB_tcp"):
        example = zero_copy["example_16MiB_tcp"]
        print(f"  e.g. frame buffer {example['frame_buffer'][0]}..{example['frame_buffer'][1]}, "
              f"array data at {example['array_data']}, owns data: {example['array_owns_data']}")
    print(f"bare pyzmq round trip with the same bytes (tcp), the transport's floor: "
          f"p50 {result['raw_zmq_tcp_roundtrip_p50_us']} us, p99 {result['raw_zmq_tcp_roundtrip_p99_us']} us")
    if "speedup_vs_ray_p50" in result:
        print(f"tree round trip vs Ray actor call (p50, tcp): {result['speedup_vs_ray_p50']}x faster")
    print("targets met: " + ", ".join(f"{k}={v}" for k, v in result["targets_met"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specray bench-protocol", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout's last line")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per stage")
    parser.add_argument("--tree-iterations", type=int, default=1000, help="zmq tree round trips per round")
    parser.add_argument("--ray-iterations", type=int, default=200, help="Ray calls per round")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray comparison")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.tree_iterations, args.ray_iterations, args.skip_ray)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
