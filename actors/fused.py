"""A decoder layer of a row-exact quantized model in a few native calls.

A decoding step of the 1.5B GGUF target spent ~15 ms of its ~80 in dispatch: about 40
small torch ops and 7 product calls per layer, each costing more to launch than to run
(BENCHMARKS.md, issue 28). Here a layer is nine calls: RMSNorm, one product for q|k|v,
rotary embedding + cache write, attention, the output product with the residual added,
RMSNorm, one product for gate|up, SwiGLU, the down product with the residual added
(`actors.native.layer`, `layer_ops.c`).

When it applies (`applies`): every linear is quantized (the model is row-exact), and the
layer is the plain Llama/Qwen kind: RMSNorm, SiLU gates, full attention, no Gemma norms.
Then every forward of the model runs it, so a verify pass and a decoding step share the
arithmetic, row by row, and speculation stays bitwise equal to decoding alone. Rows with
per-row slot plans (decoding steps, verifies) attend natively; a prompt chunk attends as
one batch through torch (`Attention.attend_cached`), as do sparse (TidalDecode) layers.

A forward whose every sequence attends row by row runs all layers in one native call
(`FusedStack`, `stack_ops.c`): the same calls in the same order, without the Python between
them, which cost a decoding step of the 1.5B several milliseconds.

`SPECRAY_FUSED_LAYERS=0` turns it off, `=layers` keeps the per-layer calls without the
stack (for measuring what each saves, and for tests).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from actors.attention_plan import Segment
from actors.layers import Block
from actors.native import layer as native_layer
from actors.quantized import QuantLinear

ENV = "SPECRAY_FUSED_LAYERS"


def stacked() -> bool:
    """Whether fused models run row-by-row forwards through `FusedStack`."""
    return os.environ.get(ENV, "1").strip() != "layers"


def applies(model) -> bool:
    """Whether `model` (an `actors.model.Transformer`) runs its layers fused."""
    cfg = model.config
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    return (model.row_exact and model.device.type == "cpu" and not cfg.gemma and cfg.hidden_act == "silu"
            and set(cfg.layer_types) == {"full_attention"} and cfg.linear is None and cfg.head_dim % 8 == 0
            and isinstance(model.output, QuantLinear)
            and all(isinstance(m, QuantLinear) for blk in model.layers
                    for m in (blk.attn.wq, blk.attn.wk, blk.attn.wv, blk.attn.wo, blk.mlp.w_gate, blk.mlp.w_up,
                              blk.mlp.w_down)))


class FusedBlock:
    """One `Block`, its products grouped by shared input."""

    def __init__(self, blk: Block) -> None:
        a, m = blk.attn, blk.mlp
        self.blk = blk
        self.heads, self.kv_heads, self.head_dim, self.scale = a.n_heads, a.n_kv, a.head_dim, a.scale
        self.qkv = native_layer.Products([a.wq, a.wk, a.wv])
        self.wo = native_layer.Products([a.wo])
        self.gate_up = native_layer.Products([m.w_gate, m.w_up])
        self.down = native_layer.Products([m.w_down])

    def __call__(self, x: Tensor, layer: int, segments: list[Segment]) -> Tensor:
        blk, H, D = self.blk, self.heads, self.head_dim
        qkv = self.qkv(native_layer.rmsnorm(x, blk.attn_norm.weight, blk.attn_norm.eps))
        outs = []
        for seg in segments:
            rows = qkv[seg.rows]
            T = rows.shape[0]
            kc, vc = seg.cache.k[layer, 0], seg.cache.v[layer, 0]
            plan = seg.plans[blk.layer_type]
            native_layer.rope_store(rows, plan.cos, plan.sin, kc, vc, seg.start, H, self.kv_heads, D)
            role = seg.step.cfg.role(layer) if seg.step else "full"
            if plan.rows is not None and role == "full":
                if plan.native_rows is None:
                    plan.native_rows = native_layer.slot_table(plan.rows)
                outs.append(native_layer.attend_rows(rows, plan.native_rows, kc, vc, H, self.kv_heads, D,
                                                     self.scale))
            else:  # a prompt chunk (one batched attention) or a sparse layer
                q = rows[:, :H * D].reshape(T, H, D).transpose(0, 1)
                outs.append(blk.attn.attend_cached(q, kc, vc, seg.start + T, plan, seg.step, role))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        x = self.wo(o, residual=x)
        gu = self.gate_up(native_layer.rmsnorm(x, blk.mlp_norm.weight, blk.mlp_norm.eps))
        return self.down(native_layer.swiglu(gu), residual=x)


class FusedStack:
    """Every `FusedBlock` of a model in one native call, for forwards it `covers`."""

    def __init__(self, blocks: list[FusedBlock], inter: int) -> None:
        specs, keep = [], []
        for fb in blocks:
            a, m = fb.blk.attn_norm, fb.blk.mlp_norm
            if any(w.dtype != torch.float32 or not w.is_contiguous() for w in (a.weight, m.weight)):
                raise ValueError("fused layers need contiguous float32 norm weights")
            specs.append(native_layer.LayerSpec(
                attn_norm=a.weight.data_ptr(), mlp_norm=m.weight.data_ptr(), attn_eps=a.eps, mlp_eps=m.eps,
                qkv=fb.qkv.spec(), wo=fb.wo.spec(), gate_up=fb.gate_up.spec(), down=fb.down.spec()))
            keep += [a.weight, m.weight, fb]
        b = blocks[0]
        dims = native_layer.Dims(hidden=b.qkv.k, heads=b.heads, kv_heads=b.kv_heads, head_dim=b.head_dim,
                                 inter=inter, scale=b.scale)
        self.stack = native_layer.Stack(specs, dims, keep)

    @staticmethod
    def covers(segments: list[Segment]) -> bool:
        """Every sequence attends row by row, densely (decoding steps and verifies)."""
        return all(seg.step is None and seg.plans["full_attention"].rows is not None for seg in segments)

    def __call__(self, x: Tensor, segments: list[Segment]) -> Tensor:
        seqs, row = [], 0
        for seg in segments:
            plan = seg.plans["full_attention"]
            if plan.native_rows is None:
                plan.native_rows = native_layer.slot_table(plan.rows)
            t = plan.cos.shape[0]
            seqs.append((row, t, seg.start, seg.cache.k, seg.cache.v, plan.cos, plan.sin, plan.native_rows))
            row += t
        return self.stack(x, seqs)
