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

The peers are in cluster/bench_protocol_peers.py, the stages in cluster/bench_protocol_stages.py.
This module keeps the run and the one result object it builds together: --json's keys and the
targets judged from them are read by BENCHMARKS.md, so they are defined in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np
import zmq

from cluster.bench_protocol_peers import TREE_NODES, WINDOW, MiB, RawZmqPeer, RayPeer, ZmqPeer
from cluster.bench_protocol_stages import (
    measure_throughput,
    measure_tree_round_trips,
    measure_zero_copy_decode,
    progress,
)

TENSOR_SIZES = {"1MiB": 1 * MiB, "16MiB": 16 * MiB}


def percentiles_us(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1e6
    return {"p50_us": round(float(np.percentile(values, 50)), 1),
            "p99_us": round(float(np.percentile(values, 99)), 1),
            "n": len(values)}


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
