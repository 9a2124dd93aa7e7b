"""Python side of `layer_ops.c`, of the many-weight product and of `stack_ops.c`: the
calls a fused decoder layer (`actors.fused`) makes, and `Stack`, all layers of a forward
in one call. Each takes float32 CPU tensors and checks what it must before handing raw
pointers to C.
"""

from __future__ import annotations

import ctypes
import threading

import torch
from torch import Tensor

from actors import native


def _lib() -> ctypes.CDLL:
    lib = native.library(native.variant())
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {native.why_unavailable()}")
    return lib


def _f32(x: Tensor, name: str) -> Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    return x.contiguous()


class ProductSpec(ctypes.Structure):  # stack_ops.c: Product
    _fields_ = [("count", ctypes.c_int32), ("has_bias", ctypes.c_int32), ("types", ctypes.c_int32 * 4),
                ("ws", ctypes.c_void_p * 4), ("ns", ctypes.c_int64 * 4), ("bias", ctypes.c_void_p * 4)]


class LayerSpec(ctypes.Structure):  # stack_ops.c: Layer
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("attn_eps", ctypes.c_float),
                ("mlp_eps", ctypes.c_float), ("qkv", ProductSpec), ("wo", ProductSpec), ("gate_up", ProductSpec),
                ("down", ProductSpec)]


class Dims(ctypes.Structure):  # stack_ops.c: Dims
    _fields_ = [("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64), ("scale", ctypes.c_float)]


class SeqSpec(ctypes.Structure):  # stack_ops.c: Seq
    _fields_ = [(name, ctypes.c_int64) for name in ("row0", "T", "start", "cap", "layer_stride")] + \
               [(name, ctypes.c_void_p) for name in ("kc", "vc", "cos", "sin", "lo", "n", "off", "idx")]


class Products:
    """Weights in GGUF blocks sharing one input, multiplied in one native call: the output
    is [M, sum of their rows], each weight's columns side by side (q|k|v, gate|up). Each
    column holds bitwise what that weight alone gives (`QuantLinear`), bias added."""

    def __init__(self, linears: list) -> None:
        """`linears`: `actors.quantized.QuantLinear`s with the same input size."""
        if not 1 <= len(linears) <= 8 or len({lin.in_features for lin in linears}) != 1:
            raise ValueError("Products takes 1 to 8 quantized linears of one input size")
        self.linears = linears  # keeps the blocks and biases alive
        self.k = linears[0].in_features
        self.sizes = [lin.out_features for lin in linears]
        self.n = sum(self.sizes)
        count = len(linears)
        self._types = (ctypes.c_int * count)(*(lin.qweight.qtype for lin in linears))
        self._ws = (ctypes.c_void_p * count)(*(lin.qweight.blocks.data_ptr() for lin in linears))
        self._ns = (ctypes.c_int64 * count)(*self.sizes)
        biases = [None if lin.bias is None else lin.bias.data_ptr() for lin in linears]
        self._bias = (ctypes.c_void_p * count)(*biases) if any(b is not None for b in biases) else None
        self._sizes32 = {native.BLOCKS[lin.qweight.qtype][0] for lin in linears}
        lib = _lib()
        self._fn, self._scratch_bytes = lib.specray_matmul_many, lib.specray_scratch_bytes

    def spec(self) -> ProductSpec:
        """These weights as `stack_ops.c` reads them."""
        count = len(self.sizes)
        if count > 4:
            raise ValueError("a stacked layer's product takes at most 4 weights")
        spec = ProductSpec(count=count, has_bias=self._bias is not None)
        for i in range(count):
            spec.types[i], spec.ws[i], spec.ns[i] = self._types[i], self._ws[i], self._ns[i]
            if self._bias is not None:
                spec.bias[i] = self._bias[i]
        return spec

    def __call__(self, x: Tensor, residual: Tensor | None = None, threads: int | None = None) -> Tensor:
        """x [M, k] -> [M, n] (+ residual [M, n], added last, as `residual + y` would)."""
        x = _f32(x, "x")
        m = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"x must be [M, {self.k}], got {list(x.shape)}")
        if residual is not None:
            residual = _f32(residual, "residual")
            if residual.shape != (m, self.n):
                raise ValueError(f"residual must be [{m}, {self.n}], got {list(residual.shape)}")
        out = torch.empty(m, self.n, dtype=torch.float32)
        scratch = torch.empty(len(self._sizes32) * self._scratch_bytes(m, self.k), dtype=torch.uint8)
        code = self._fn(len(self.sizes), self._types, self._ws, self._ns, self._bias, x.data_ptr(), m, self.k,
                        None if residual is None else residual.data_ptr(), out.data_ptr(),
                        threads or torch.get_num_threads(), scratch.data_ptr())
        if code != 0:
            raise ValueError(f"native product refused its arguments (code {code})")
        return out


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) per row of x [M, K]."""
    x, weight = _f32(x, "x"), _f32(weight, "weight")
    out = torch.empty_like(x)
    _lib().specray_rmsnorm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def rope_store(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, start: int,
               heads: int, kv_heads: int, head_dim: int) -> None:
    """qkv [T, (heads + 2 kv_heads) head_dim] (rows contiguous): rotate q in place; write
    rotated k and v to cache slots [start, start + T) of k/v_cache [kv_heads, cap, head_dim]."""
    T = qkv.shape[0]
    if qkv.stride(1) != 1 or qkv.shape[1] < (heads + 2 * kv_heads) * head_dim:
        raise ValueError("qkv rows must be contiguous and hold q, k and v")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.dtype != torch.float32:
        raise ValueError("the KV cache must be contiguous float32")
    if start + T > k_cache.shape[1]:
        raise ValueError(f"cache slots [{start}, {start + T}) past its {k_cache.shape[1]}")
    cos, sin = _f32(cos, "cos"), _f32(sin, "sin")
    _lib().specray_rope_store(qkv.data_ptr(), T, qkv.stride(0), heads, kv_heads, head_dim, cos.data_ptr(),
                              sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], start)


def slot_table(rows: list) -> tuple[Tensor, Tensor]:
    """Which cache slots each row sees (`rows[t]`: a slice, or a long tensor of slots), as
    `attend_rows` reads them: meta [3, T] (first slot, count, offset into slots or -1 for
    a contiguous run) and slots (the listed ones, concatenated). Built once per forward
    and shared by every layer."""
    lo, n, off, idx, total = [], [], [], [], 0
    for r in rows:
        if isinstance(r, slice):
            lo.append(r.start or 0)
            n.append(r.stop - (r.start or 0))
            off.append(-1)
        else:
            lo.append(0)
            n.append(r.numel())
            off.append(total)
            idx.append(r.to(torch.int64))
            total += r.numel()
    meta = torch.tensor([lo, n, off], dtype=torch.int64)
    return meta, (torch.cat(idx) if idx else meta)  # any valid pointer when no row lists slots


def attend_rows(q: Tensor, table: tuple[Tensor, Tensor], k_cache: Tensor, v_cache: Tensor, heads: int,
                kv_heads: int, head_dim: int, scale: float, threads: int | None = None) -> Tensor:
    """Each row of q [T, >= heads * head_dim] (rows contiguous) attends alone over its
    cache slots (`slot_table`) -> [T, heads * head_dim]."""
    meta, slots = table
    T = q.shape[0]
    if meta.shape != (3, T) or q.stride(1) != 1:
        raise ValueError(f"attend_rows needs one slot list per row ({T}) and contiguous rows")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.dtype != torch.float32:
        raise ValueError("the KV cache must be contiguous float32")
    out = torch.empty(T, heads * head_dim, dtype=torch.float32)
    code = _lib().specray_attend_rows(q.data_ptr(), T, q.stride(0), heads, kv_heads, head_dim, k_cache.data_ptr(),
                                      v_cache.data_ptr(), k_cache.shape[1], meta[0].data_ptr(), meta[1].data_ptr(),
                                      meta[2].data_ptr(), slots.data_ptr(), scale, out.data_ptr(),
                                      threads or torch.get_num_threads())
    if code != 0:
        raise ValueError(f"native attention refused its arguments (code {code})")
    return out


def swiglu(gate_up: Tensor) -> Tensor:
    """[M, 2I] (gate | up) -> silu(gate) * up [M, I]."""
    gate_up = _f32(gate_up, "gate_up")
    m, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(m, i, dtype=torch.float32)
    _lib().specray_swiglu(gate_up.data_ptr(), m, i, out.data_ptr())
    return out


class Stack:
    """Every layer of a forward in one native call (`stack_ops.c`): the same functions the
    per-layer calls above make, in the same order, so the same bits. For forwards where
    every sequence attends row by row (`attend_rows`)."""

    def __init__(self, layers: list[LayerSpec], dims: Dims, keep: list) -> None:
        """`keep`: what owns the memory the specs point at (weights, norms)."""
        self.layers = (LayerSpec * len(layers))(*layers)
        self.dims, self._keep = dims, keep
        self._work = threading.local()  # per thread: two runners may share one model across threads
        self.timing: ctypes.Array | None = None  # [products, other layer ops] seconds, summed while set
        lib = _lib()
        self._fn, self._bytes = lib.specray_stack_forward, lib.specray_stack_workspace

    def __call__(self, x: Tensor, seqs: list[tuple], threads: int | None = None) -> Tensor:
        """x [M, hidden] (updated in place and returned) through every layer. `seqs`: per
        sequence (first row, rows, cache start, k cache, v cache [layers, 1, kv_heads, cap,
        head_dim], cos, sin [rows, head_dim], slot table (`slot_table`)), rows in order."""
        d = self.dims
        x = _f32(x, "x")
        m = x.shape[0]
        if x.dim() != 2 or x.shape[1] != d.hidden:
            raise ValueError(f"x must be [M, {d.hidden}], got {list(x.shape)}")
        specs, row = (SeqSpec * len(seqs))(), 0
        for spec, (row0, t, start, k, v, cos, sin, (meta, slots)) in zip(specs, seqs):
            if row0 != row or meta.shape != (3, t) or cos.shape != (t, d.head_dim) or not cos.is_contiguous() \
                    or not sin.is_contiguous() or cos.dtype != torch.float32 or sin.dtype != torch.float32:
                raise ValueError("sequences must cover the rows in order, each with its positions and slots")
            if not (k.is_contiguous() and v.is_contiguous() and k.dtype == torch.float32 and k.shape == v.shape
                    and k.shape[0] == len(self.layers) and k.shape[2] == d.kv_heads and k.shape[4] == d.head_dim):
                raise ValueError(f"the KV cache must be contiguous float32 [{len(self.layers)}, 1, {d.kv_heads}, "
                                 f"cap, {d.head_dim}], got {list(k.shape)} {k.dtype}")
            if start + t > k.shape[3]:
                raise ValueError(f"cache slots [{start}, {start + t}) past its {k.shape[3]}")
            spec.row0, spec.T, spec.start, spec.cap, spec.layer_stride = row0, t, start, k.shape[3], k.stride(0)
            spec.kc, spec.vc, spec.cos, spec.sin = k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr()
            spec.lo, spec.n, spec.off, spec.idx = meta[0].data_ptr(), meta[1].data_ptr(), meta[2].data_ptr(), \
                slots.data_ptr()
            row += t
        if row != m:
            raise ValueError(f"the sequences cover {row} rows of {m}")
        need = self._bytes(ctypes.byref(d), m)
        work = getattr(self._work, "buf", None)
        if work is None or work.numel() < need:
            work = self._work.buf = torch.empty(need, dtype=torch.uint8)
        code = self._fn(self.layers, len(self.layers), ctypes.byref(d), specs, len(seqs), x.data_ptr(), m,
                        threads or torch.get_num_threads(), work.data_ptr(), self.timing)
        if code != 0:
            raise ValueError(f"native layer stack refused its arguments (code {code})")
        return x
