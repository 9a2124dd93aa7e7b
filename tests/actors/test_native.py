"""The GGUF block kernels against gguf-py's own dequantization and an exact reference of
their arithmetic, in every instruction-set variant this CPU can run."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from actors import native

pytestmark = pytest.mark.skipif(not native.available("scalar"), reason="no C compiler")

QTYPES = [native.Q4_0, native.Q5_0, native.Q8_0, native.Q4_K, native.Q6_K]
VARIANTS = native.runnable_variants()


def random_blocks(qtype: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of every code: random bytes, with the f16 scales made finite and small."""
    rng = np.random.default_rng(seed + qtype)
    size, nbytes = native.BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(n * (k // size), nbytes), dtype=np.uint8)
    scale_at = {native.Q4_K: (0, 2), native.Q6_K: (208,)}.get(qtype, (0,))
    for at in scale_at:
        d = (rng.uniform(0.001, 0.02, size=len(blocks)) * rng.choice([-1, 1], len(blocks))).astype(np.float16)
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


def codes_and_scales(qtype: int, blocks: np.ndarray, k: int):
    """Per 32-group: signed or unsigned integer codes [n, k], the integer scale of each
    16 codes, the f16 d (and dmin) per block, Q4_K's integer mins per 32: read from the
    layout gguf-py documents (gguf.quants), independently of the C code."""
    n = blocks.shape[0]
    size, nbytes = native.BLOCKS[qtype]
    b = blocks.reshape(n * (k // size), nbytes)
    if qtype == native.Q8_0:
        d = b[:, :2].copy().view(np.float16).astype(np.float64)
        return b[:, 2:].copy().view(np.int8).astype(np.int64), np.ones((len(b), 2)), d, None, None
    if qtype == native.Q4_K:
        d = b[:, 0:2].copy().view(np.float16).astype(np.float64)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float64)
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 15).reshape(len(b), 256).astype(np.int64)
        return codes, np.repeat(sc.astype(np.int64), 2, axis=1), d, dmin, mn.astype(np.int64)
    # Q6_K
    ql, qh = b[:, :128], b[:, 128:192]
    codes = np.zeros((len(b), 256), np.int64)
    for j in range(8):
        h, r = divmod(j, 4)
        lo = (ql[:, 64 * h + 32 * (r % 2): 64 * h + 32 * (r % 2) + 32] >> (4 * (r // 2))) & 15
        hi = (qh[:, 32 * h: 32 * h + 32] >> (2 * r)) & 3
        codes[:, 32 * j: 32 * j + 32] = (lo | (hi << 4)).astype(np.int64) - 32
    d = b[:, 208:210].copy().view(np.float16).astype(np.float64)
    return codes, b[:, 192:208].copy().view(np.int8).astype(np.int64), d, None, None


def reference_matmul(qtype: int, x: np.ndarray, blocks: np.ndarray, k: int) -> np.ndarray:
    """The kernel's contract (the top of ggml_blocks.c) in float64 with exact integer sums:
    activations rounded to int8 per block (d = max|x|/127 in float32, half to even), exact
    integer products per group, lanes of 4 elements, fused multiply-adds per block."""
    n = blocks.shape[0]
    size = native.BLOCKS[qtype][0]
    codes, scales, d, dmin, mins = codes_and_scales(qtype, blocks, k)
    codes = codes.reshape(n, k // size, size)
    out = np.zeros((x.shape[0], n))
    for m in range(x.shape[0]):
        xb = x[m].reshape(-1, size).astype(np.float32)
        dx = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
        inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), 0).astype(np.float32)
        q = np.rint(xb * inv[:, None]).astype(np.int64)  # [blocks, size]
        prod = codes * q[None]  # [n, blocks, size], exact
        # lane l of each 32-group: elements 4l..4l+3; each 16 codes have their own scale
        lane = prod.reshape(n, k // size, size // 32, 8, 4).sum(axis=4)
        if qtype == native.Q8_0:
            isum = lane[:, :, 0, :]
        else:
            s16 = scales.reshape(n, k // size, size // 16)
            isum = (lane * np.repeat(s16.reshape(n, k // size, size // 32, 2), 4, axis=3)).sum(axis=2)
        dd = d.reshape(n, k // size)[:, :, None]
        acc = ((dd * dx.astype(np.float64)[None, :, None]) * isum).sum(axis=(1, 2))
        if mins is not None:
            xs = q.reshape(k // size, size // 32, 32).sum(axis=2)
            msum = (mins.reshape(n, k // size, size // 32) * xs[None]).sum(axis=2)
            acc -= (dmin.reshape(n, k // size) * dx.astype(np.float64)[None] * msum).sum(axis=1)
        out[m] = acc
    return out


@pytest.mark.parametrize("qtype", QTYPES, ids=[native.NAMES[q] for q in QTYPES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantize_equals_gguf_bit_for_bit(qtype, variant):
    k = 512
    blocks = random_blocks(qtype, 6, k)
    ours = native.dequantize(qtype, torch.from_numpy(blocks), 6, k, name=variant).numpy()
    theirs = gguf.quants.dequantize(blocks, qtype).reshape(6, k)
    assert np.array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))
    some = native.dequantize(qtype, torch.from_numpy(blocks), 6, k, rows=torch.tensor([4, 0, 4]), name=variant)
    assert np.array_equal(some.numpy(), theirs[[4, 0, 4]])


@pytest.mark.parametrize("qtype", QTYPES, ids=[native.NAMES[q] for q in QTYPES])
def test_every_variant_gives_the_same_bits_and_stays_within_the_stated_bound(qtype):
    n, k = 40, 512
    blocks = torch.from_numpy(random_blocks(qtype, n, k, seed=3))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(qtype))
    x[2] = 0.0  # an all-zero row: scale 0, no division by zero
    outs = {v: native.matmul(qtype, x, blocks, n, k, name=v) for v in VARIANTS}
    first = outs[VARIANTS[0]]
    for v, out in outs.items():
        assert torch.equal(out, first), v
    # the stated bound: activations are rounded to int8 per 32 (error <= d/2 per element),
    # weights are the file's exactly; float32 sums add a little on top
    w = native.dequantize(qtype, blocks, n, k).double()
    xd = x.double()
    exact = xd @ w.T
    d = x.abs().reshape(5, -1, 32).amax(dim=2).double() / 127
    bound = (w.abs().reshape(n, -1, 32).sum(dim=2) @ d.T).T / 2 + 1e-4 * (xd.abs() @ w.abs().T) + 1e-6
    assert bool(((first.double() - exact).abs() <= bound).all())
    assert torch.equal(first[2], torch.zeros(n))


@pytest.mark.parametrize("qtype", [native.Q4_K, native.Q6_K, native.Q8_0])
def test_the_kernel_computes_its_stated_arithmetic(qtype):
    n, k = 24, 512
    blocks = random_blocks(qtype, n, k, seed=5)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    ours = native.matmul(qtype, torch.from_numpy(x), torch.from_numpy(blocks), n, k).numpy()
    want = reference_matmul(qtype, x, blocks, k)
    # equal up to float32 rounding of a few dozen block terms
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("qtype", QTYPES, ids=[native.NAMES[q] for q in QTYPES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_row_gets_the_same_bits_alone_or_in_a_batch_on_any_thread_count(qtype, variant):
    # one row takes its own code path (accumulators in registers, codes used as unpacked),
    # so this is where a decoding step and a verify could part ways
    n, k = 64, 768
    blocks = torch.from_numpy(random_blocks(qtype, n, k, seed=9))
    x = torch.randn(70, k, generator=torch.Generator().manual_seed(2))  # > one 32-row chunk
    batch = native.matmul(qtype, x, blocks, n, k, threads=2, name=variant)
    assert torch.equal(native.matmul(qtype, x, blocks, n, k, threads=1, name=variant), batch)
    for m in (0, 33, 69):
        assert torch.equal(native.matmul(qtype, x[m:m + 1], blocks, n, k, threads=1, name=variant)[0], batch[m])
    assert torch.equal(batch, native.matmul(qtype, x, blocks, n, k, name=VARIANTS[0]))


def test_bad_shapes_and_forced_variants_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="multiple"):
        native.row_bytes(native.Q4_K, 300)
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=native.ISA_ENV):
        native.variant()
    for v in VARIANTS:
        monkeypatch.setenv(native.ISA_ENV, v)
        assert native.variant() == v


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """Builds land in a cache of their own; the process's loaded libraries are forgotten
    before and after (the next test loads from the usual cache again)."""
    from actors.paths import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def test_a_compiler_command_with_a_wrapper_builds(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", f"env {native.compiler()[0]}")  # like CC="ccache gcc"
    assert native.available("scalar")
    assert list(fresh_cache.glob("native/*/ggml_blocks_scalar.so"))


def test_a_missing_or_hanging_compiler_falls_back_instead_of_raising(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", "no-such-ccache gcc")
    assert native.library("scalar") is None and not native.available("scalar")
    assert "build failed" in native.why_unavailable()
    native.library.cache_clear()
    hanging = fresh_cache / "hanging-cc"
    hanging.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo "hanging-cc 1.0"; exit 0; }\nsleep 60\n')
    hanging.chmod(0o755)
    monkeypatch.setenv("CC", str(hanging))
    monkeypatch.setattr(native, "COMPILE_TIMEOUT_S", 1.0)
    assert native.library("scalar") is None  # after a second, not a minute
    assert not list(fresh_cache.glob("native/*/*.tmp"))  # nothing half-written left behind


def test_a_corrupt_cached_library_is_built_again(fresh_cache):
    import subprocess
    import sys

    assert native.library("scalar") is not None
    (cached,) = fresh_cache.glob("native/*/ggml_blocks_scalar.so")
    broken = cached.with_suffix(".broken")  # a new file: the loaded one stays mapped in this process
    broken.write_bytes(b"\x7fELF truncated by a crash")
    broken.replace(cached)
    # a fresh process, as the next start would be (this one has the good library loaded by name)
    probe = "from actors import native; lib = native.library('scalar'); print(lib.specray_variant())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(list(native.VARIANTS).index("scalar"))
    assert cached.stat().st_size > 1000 and "does not load" in out.stderr
