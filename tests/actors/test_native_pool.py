"""The native kernels' team of threads (actors/native/pool.c): one per process, whichever
thread calls; the same bits on any thread count; a forked child gets a team of its own."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading

import numpy as np
import torch

from actors import native
from tests.actors.test_native import random_blocks

QTYPE, N, K = native.Q4_K, 96, 512


def case(rows: int = 5, n: int = N):
    blocks = torch.from_numpy(random_blocks(QTYPE, n, K, seed=4))
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(5))
    return blocks, x


def test_loops_from_many_threads_share_one_team_and_give_the_same_bits():
    blocks, x = case()
    want = native.matmul(QTYPE, x, blocks, N, K, threads=1)
    workers = native.library(native.variant()).specray_pool_workers
    before = workers()
    results, errors = [], []

    def work(threads: int) -> None:
        try:
            for _ in range(20):
                results.append(native.matmul(QTYPE, x, blocks, N, K, threads=threads))
        except Exception as e:  # surfaced below: a thread's exception is otherwise only printed
            errors.append(e)

    callers = [threading.Thread(target=work, args=(t,)) for t in (2, 3, 2, 3)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(timeout=120)
    assert not errors and not any(c.is_alive() for c in callers)
    assert len(results) == 80 and all(torch.equal(r, want) for r in results)
    # one team for the process: as many workers as the widest loop needs, not one set per caller
    assert workers() <= max(before, 2)


def test_more_threads_than_rows_and_one_row():
    blocks, x = case(rows=2, n=3)
    want = native.matmul(QTYPE, x, blocks, 3, K, threads=1)
    for threads in (2, 3, 7):
        assert torch.equal(native.matmul(QTYPE, x, blocks, 3, K, threads=threads), want)
    one = native.matmul(QTYPE, x[:1], blocks[:1], 1, K, threads=4)
    assert torch.equal(one, want[:1, :1])


def test_a_forked_child_starts_a_team_of_its_own():
    blocks, x = case()
    want = native.matmul(QTYPE, x, blocks, N, K, threads=2)  # the parent's workers exist now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's workers are not here; without its own it would wait forever
        try:
            out = native.matmul(QTYPE, x, blocks, N, K, threads=2).numpy().tobytes()
            os.write(write_end, out)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        got, size = b"", want.numel() * 4
        while len(got) < size:
            ready, _, _ = select.select([read_end], [], [], 60)
            assert ready, "the forked child's loop never finished"
            chunk = os.read(read_end, size - len(got))
            assert chunk, "the forked child exited without its result"
            got += chunk
    finally:
        os.close(read_end)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    assert np.array_equal(np.frombuffer(got, dtype=np.float32).reshape(want.shape), want.numpy())


SELFTEST = """
import ctypes, threading
from actors import native
selftest = native.library(native.variant()).specray_pool_selftest
selftest.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
selftest.restype = ctypes.c_int64
sums = []
callers = [threading.Thread(target=lambda t=t: sums.append(selftest(40, t, 6, 100))) for t in (2, 3, 2)]
for c in callers:
    c.start()
for c in callers:
    c.join()
print(sorted(sums))
"""


def test_sleeping_callers_and_workers_lose_no_range():
    # workers slower than the caller's spin, pauses longer than the workers': both sleep
    # paths, from three threads at once; in a child, so a lost wake-up fails, not hangs
    proc = subprocess.run([sys.executable, "-c", SELFTEST], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == str([40 * 15] * 3)
