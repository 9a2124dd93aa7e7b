"""The stages of `specray bench-protocol`: tree round trips, windowed tensor throughput, and
the zero-copy decode check.

Every stage interleaves its peers round by round, so that load from other jobs on the
machine hits every method alike and the figures compare; each stage warms every path up
before it times anything, and reports progress on stderr as it goes.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import numpy as np
import zmq

from cluster.bench_protocol_peers import FINGERPRINT, TREE_NODES, MiB, make_tree, tree_parents
from protocol import decode, encode, ipc_endpoint, is_zero_copy, owning_frame

# Steps only move forward within a session (older ones are dropped as stale): one counter.
_steps = itertools.count(1)


def progress(text: str) -> None:
    print(f"[bench-protocol] {text}", file=sys.stderr, flush=True)


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
