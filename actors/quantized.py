"""Quantized weights in the model: GGUF blocks, multiplied where they lie.

A `QuantWeight` is a weight matrix [n, k] kept as GGUF blocks (uint8 [n, row_bytes]) of
one type: Q4_0, Q5_0, Q8_0, Q4_K or Q6_K. `QuantLinear` multiplies by it with the native
kernels (`actors.native`: activations rounded to int8 per 32, exact integer products,
the file's weights exactly); `QuantEmbedding` dequantizes only the rows a forward looks up.

Where they come from:
- `--dtype gguf`: the GGUF file's own blocks (`actors.gguf_model`);
- `--dtype int8` / `int4`: a dense model's linears quantized here, group-wise with one
  scale per 32 weights, to Q8_0 / Q4_0 (gguf-py's reference quantizers).

Why these kernels and not torch's: on the dev CPU (BENCHMARKS.md, "Quantized kernels"),
torch's `_weight_int8pack_mm` keeps one scale per output channel (not group-wise, so it
cannot hold the file's Q8_0/Q6_K/Q5_0 weights exactly) and `_weight_int4pack_mm_for_cpu`
takes groups of 32 or more (Q6_K's are 16); and at 1 row they measured 7x and 17x slower
than the native kernels, growing linearly with rows (`benchmarks/quant_kernels.py`).
torchao adds no CPU kernel for these formats on x86.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from actors import native

FORMATS = {"int8": native.Q8_0, "int4": native.Q4_0}  # --dtype name -> block type


class QuantWeight:
    """A [n, k] weight as GGUF blocks of one type."""

    def __init__(self, blocks: Tensor, qtype: int, n: int, k: int):
        if qtype not in native.BLOCKS:
            raise ValueError(f"unsupported block type {qtype}")
        if tuple(blocks.shape) != (n, native.row_bytes(qtype, k)) or blocks.dtype != torch.uint8:
            raise ValueError(f"{native.NAMES[qtype]} blocks for [{n}, {k}] must be uint8 "
                             f"[{n}, {native.row_bytes(qtype, k)}], got {blocks.dtype} {list(blocks.shape)}")
        self.blocks, self.qtype, self.n, self.k = blocks.contiguous(), qtype, n, k

    @classmethod
    def quantize(cls, weight: Tensor, qtype: int) -> QuantWeight:
        import gguf

        n, k = weight.shape
        blocks = gguf.quants.quantize(weight.detach().float().cpu().numpy(), gguf.GGMLQuantizationType(qtype))
        return cls(torch.from_numpy(np.ascontiguousarray(blocks)), qtype, n, k)

    @property
    def type_name(self) -> str:
        return native.NAMES[self.qtype]

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def matmul(self, x: Tensor) -> Tensor:
        return native.matmul(self.qtype, x, self.blocks, self.n, self.k)

    def rows(self, ids: Tensor) -> Tensor:
        return native.dequantize(self.qtype, self.blocks, self.n, self.k, rows=ids)

    def dense(self) -> Tensor:
        return native.dequantize(self.qtype, self.blocks, self.n, self.k)


class QuantLinear(nn.Module):
    """x @ w.T + b with w as GGUF blocks. float32 in, float32 out."""

    row_independent = True  # a row's result is the same bits whatever else is in x (tested)

    def __init__(self, weight: QuantWeight, bias: Tensor | None = None):
        super().__init__()
        self.qweight = weight
        self.register_buffer("blocks", weight.blocks, persistent=False)  # moves and counts with the module
        self.bias = nn.Parameter(bias.float(), requires_grad=False) if bias is not None else None

    @property
    def in_features(self) -> int:
        return self.qweight.k

    @property
    def out_features(self) -> int:
        return self.qweight.n

    def forward(self, x: Tensor) -> Tensor:
        y = self.qweight.matmul(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.qweight.type_name}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Token embeddings kept as blocks: a lookup dequantizes only the rows it needs."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.qweight = weight
        self.register_buffer("blocks", weight.blocks, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight.rows(ids)


def quantize_linears(model: nn.Module, fmt: str) -> nn.Module:
    """Replace every dense linear of our Transformer with its `fmt` (int8/int4) blocks.
    Weights whose input size is not a multiple of 32 stay dense."""
    from actors.layers import Linear

    qtype = FORMATS[fmt]
    if not native.available():  # resolve_dtype said so: the model stays dense
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and child.weight.shape[1] % native.BLOCKS[qtype][0] == 0:
                setattr(parent, name, QuantLinear(QuantWeight.quantize(child.weight, qtype), child.bias))
    return model


def summary(model: nn.Module) -> dict[str, str]:
    """{"in x out": "Q4_K"}: what each quantized shape class is stored as, for reports."""
    out: dict[str, set[str]] = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            w = m.qweight
            out.setdefault(f"{w.k}x{w.n}", set()).add(w.type_name)
    return {shape: "+".join(sorted(types)) + f" (native {native.variant()})" for shape, types in out.items()}
