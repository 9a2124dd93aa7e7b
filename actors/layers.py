"""The layers of a decoder-only transformer: linears on the tuned kernels, RMSNorm,
attention (exact, row by row, sparse or linear, as the plan says), MLP, and the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actors import kernels
from actors import linear_attention as lin
from actors.attention_plan import AttnPlan, Segment
from actors.model_config import ModelConfig
from actors.tidal import SparseStep, attend_select, attend_sparse


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Linear(nn.Module):
    """x @ w.T + b with the kernel chosen for this weight's shape and x's row count
    (`actors.kernels.tune`; F.linear until tuned)."""

    kernels: tuple = kernels.DEFAULT  # index: rows - 1, capped at kernels.MAX_ROWS

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return self.kernels[min(x.shape[0], kernels.MAX_ROWS) - 1](x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Llama/Qwen: w * norm(x); Gemma: norm(x) * (1 + w), computed in float32."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)



class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.group = cfg.n_heads // cfg.n_kv_heads
        self.scale = cfg.attn_scale
        self.wq = Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.qkv_bias)
        self.wk = Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias)
        self.wv = Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, True) if cfg.gemma else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, True) if cfg.gemma else None
        self.linear: lin.LinearParams | None = None  # a linearized layer's feature maps and convolution

    def forward(self, x: Tensor, layer: int, kind: str, segments: list[Segment]) -> Tensor:
        """x [N, hidden]: the new tokens of every sequence in this forward, one `Segment` each.
        The projections run once over all N rows (reading each weight once is the cost of a
        decoding step on CPU); attention runs per sequence, over its own cache."""
        N, D = x.shape[0], self.head_dim
        q = self.wq(x).view(N, self.n_heads, D)
        k = self.wk(x).view(N, self.n_kv, D)
        v = self.wv(x).view(N, self.n_kv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        outs = []
        for seg in segments:
            r = seg.rows
            kc, vc = seg.cache.k[layer, 0], seg.cache.v[layer, 0]
            role = seg.step.cfg.role(layer) if seg.step else "full"
            sums = seg.sums[layer] if seg.sums else None
            outs.append(self._attend(q[r].transpose(0, 1), k[r].transpose(0, 1), v[r].transpose(0, 1), kc, vc,
                                     seg.start, seg.plans[kind], seg.step, role, sums))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.wo(o.to(x.dtype))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, start: int, plan: AttnPlan,
                sparse: SparseStep | None, role: str, sums: Tensor | None) -> Tensor:
        """One sequence: q [H, T, D], k/v [Hkv, T, D] -> attention output [T, H * D]."""
        T = q.shape[1]
        q = q * plan.cos + rotate_half(q) * plan.sin
        k = k * plan.cos + rotate_half(k) * plan.sin
        kc[:, start:start + T] = k
        vc[:, start:start + T] = v
        return self.attend_cached(q, kc, vc, start + T, plan, sparse, role, sums)

    def attend_cached(self, q: Tensor, kc: Tensor, vc: Tensor, end: int, plan: AttnPlan, sparse: SparseStep | None,
                      role: str, sums: Tensor | None = None) -> Tensor:
        """Rotated queries q [H, T, D] over the cache, whose new entries are written up to
        slot `end`, as the plan says -> [T, H * D]."""
        T, D = q.shape[1], self.head_dim
        if self.linear is not None:
            st = plan.linear
            o = lin.attend(self.linear, q, kc[:, st.lo:st.end], vc[:, st.lo:st.end], st, sums, self.scale)
            return o.transpose(0, 1).reshape(T, self.n_heads * D)
        if sparse is not None and role != "full":
            attend = attend_select if role == "select" else attend_sparse
            o = attend(q.reshape(self.n_kv, self.group * T, D), kc, vc, end, sparse, self.scale)
            return o.reshape(self.n_heads, T, D).transpose(0, 1).reshape(T, self.n_heads * D)
        if plan.rows is not None:
            o = torch.stack([self._attend_row(q[:, r], kc, vc, slots) for r, slots in enumerate(plan.rows)], dim=1)
            return o.transpose(0, 1).reshape(T, self.n_heads * D)
        keys, vals = kc[None, :, plan.lo:end], vc[None, :, plan.lo:end]
        if plan.causal:
            o = F.scaled_dot_product_attention(q[None], keys, vals, is_causal=True, scale=self.scale,
                                               enable_gqa=self.group > 1)
        else:
            # Fold the `group` query heads sharing a KV head into the query axis: no K/V expand.
            o = F.scaled_dot_product_attention(q.reshape(1, self.n_kv, self.group * T, D), keys, vals,
                                               attn_mask=plan.mask, scale=self.scale)
        return o.reshape(self.n_heads, T, D).transpose(0, 1).reshape(T, self.n_heads * D)

    def _attend_row(self, q: Tensor, kc: Tensor, vc: Tensor, slots: slice | Tensor) -> Tensor:
        """One token's query heads [H, D] over the given cache slots -> [H, D]."""
        if isinstance(slots, slice):
            keys, vals = kc[None, :, slots], vc[None, :, slots]
        else:
            keys, vals = kc[:, slots][None], vc[:, slots][None]
        o = F.scaled_dot_product_attention(q.reshape(1, self.n_kv, self.group, q.shape[-1]), keys, vals,
                                           scale=self.scale)
        return o.reshape(self.n_heads, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.w_up = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)
        self.tanh_gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: Tensor) -> Tensor:
        g = self.w_gate(x)
        g = F.gelu(g, approximate="tanh") if self.tanh_gelu else F.silu(g)
        return self.w_down(g * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        gemma, eps = cfg.gemma, cfg.rms_norm_eps
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, eps, gemma)  # input_layernorm
        # llama/qwen post_attention_layernorm, gemma pre_feedforward
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps, gemma)
        # gemma3 "sandwich" norms on the branch outputs
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps, True) if gemma else None
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps, True) if gemma else None

    def forward(self, x: Tensor, layer: int, segments: list[Segment]) -> Tensor:
        h = self.attn(self.attn_norm(x), layer, self.layer_type, segments)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h
