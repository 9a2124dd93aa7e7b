"""A compact decoder-only transformer for Qwen2, Llama and Gemma3 (text).

``Transformer.from_hf(hf_model)`` wraps the parameters of an already-loaded Hugging Face
model (same tensors, no copy). ``forward`` takes T new tokens for one sequence, appends
their keys/values to a ``KVCache`` and returns float32 logits. With ``positions`` and a
``tree_mask`` it verifies a whole token tree in one pass: each node sees the committed
cache plus the new tokens its mask row allows, at its own RoPE position, which gives the
same logits as feeding that node's root-to-node path as a plain sequence.

Every linear runs the kernel measured fastest on this machine for its shape and row count
(``actors.kernels``; ``tune_kernels``). Grouped-query attention folds the query heads of
one KV group into the query length, so K/V are never expanded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actors import kernels
from actors import linear_attention as lin
from actors.tidal import MAX_SPARSE_TOKENS, SparseStep, TidalConfig, attend_select, attend_sparse
from decoding.kv_cache import KVCache

SUPPORTED_FAMILIES = ("qwen2", "llama", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
_HF_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}


# --------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    family: str  # "qwen2" | "llama" | "gemma3"
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling of the (global) layers: None or {"rope_type": "linear"|"llama3", ...hf params}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"
    sliding_window: int | None = None  # key hidden when pos_q - pos_k >= sliding_window
    rope_local_theta: float | None = None  # RoPE base of sliding layers (gemma3); None = rope_theta
    query_pre_attn_scalar: float | None = None  # gemma3: attention scale = this ** -0.5
    final_logit_softcapping: float | None = None
    linear: lin.LinearConfig | None = None  # set by `Transformer.linearize`

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; supported: {SUPPORTED_ACTS}")
        self.layer_types = tuple(self.layer_types) or ("full_attention",) * self.n_layers
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        bad = set(self.layer_types) - set(LAYER_TYPES)
        if bad:
            raise ValueError(f"unsupported layer types {sorted(bad)}; supported: {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", "default")
            if rt not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported RoPE scaling type {rt!r}; supported: {SUPPORTED_ROPE_TYPES}")
            if rt != "default" and "factor" not in self.rope_scaling:
                raise ValueError(f"RoPE scaling {rt!r} needs a 'factor'")
            if rt == "llama3":
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        raise ValueError(f"llama3 RoPE scaling needs {key!r}")
        if self.family == "gemma3" and not self.query_pre_attn_scalar:
            raise ValueError("gemma3 needs query_pre_attn_scalar")

    # family traits
    @property
    def gemma(self) -> bool:
        return self.family == "gemma3"

    @property
    def attn_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5 if self.gemma else self.head_dim ** -0.5

    @classmethod
    def from_hf(cls, hf_config) -> ModelConfig:
        """Translate a transformers (v5) config; refuse what this implementation can't run."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type == "gemma3" and getattr(hf_config, "text_config", None) is not None:
            hf_config = hf_config.text_config  # multimodal wrapper: the text decoder only
            model_type = hf_config.model_type
        family = _HF_MODEL_TYPES.get(model_type)
        if family is None:
            raise ValueError(f"unsupported model family {model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_FAMILIES)} (transformers model_type qwen2, llama, gemma3_text)")
        c = hf_config
        n_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        rp = c.rope_parameters or {}
        if family == "gemma3":
            g, loc = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
            if loc.get("rope_type", "default") != "default":
                raise ValueError(f"gemma3: unsupported RoPE scaling on sliding layers: {loc}")
            glob_params, local_theta = g, float(loc.get("rope_theta", 10000.0))
            if getattr(c, "attn_logit_softcapping", None) is not None:
                raise ValueError("gemma3: attn_logit_softcapping is not supported")
            if getattr(c, "use_bidirectional_attention", False):
                raise ValueError("gemma3: use_bidirectional_attention is not supported (decoder only)")
            act = c.hidden_activation
        else:
            glob_params, local_theta, act = rp, None, c.hidden_act
        if float(glob_params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        rope_type = glob_params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
        rope_scaling = None
        if rope_type != "default":
            rope_scaling = {k: v for k, v in glob_params.items() if k != "rope_theta"}
            if rope_type == "llama3":
                rope_scaling.setdefault("original_max_position_embeddings", c.max_position_embeddings)
        layer_types = tuple(getattr(c, "layer_types", None) or ("full_attention",) * c.num_hidden_layers)
        sliding = getattr(c, "sliding_window", None) if "sliding_attention" in layer_types else None
        if family == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(getattr(c, "attention_bias", False))
            mlp_bias = bool(getattr(c, "mlp_bias", False))
        return cls(
            family=family, vocab_size=c.vocab_size, hidden_size=c.hidden_size, n_layers=c.num_hidden_layers,
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, intermediate_size=c.intermediate_size,
            rms_norm_eps=float(c.rms_norm_eps), rope_theta=float(glob_params.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling, max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), hidden_act=act,
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, layer_types=layer_types,
            sliding_window=sliding, rope_local_theta=local_theta,
            query_pre_attn_scalar=getattr(c, "query_pre_attn_scalar", None) if family == "gemma3" else None,
            final_logit_softcapping=getattr(c, "final_logit_softcapping", None),
        )


def rope_inv_freq(theta: float, head_dim: int, scaling: dict | None = None) -> Tensor:
    """Inverse frequencies [head_dim // 2] (float32), as transformers computes them."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rt = (scaling or {}).get("rope_type", "default")
    if rt == "linear":
        inv = inv / scaling["factor"]
    elif rt == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


# --------------------------------------------------------------------------- layers


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


# --------------------------------------------------------------------------- blocks


@dataclass
class _AttnPlan:
    """How one kind of layer (full / sliding) attends in this forward; shared by its layers."""
    lo: int  # first cache slot attended (sliding layers skip slots out of every query's window)
    mask: Tensor | None  # bool [g*T, end - lo], already repeated for the folded GQA layout
    causal: bool  # plain prefill of an empty cache: let SDPA do the causal mask
    cos: Tensor  # [T, head_dim]
    sin: Tensor
    # Row-exact models only: per new token, the cache slots it sees, in order (a slice when
    # they are contiguous). Each row then attends alone, in exactly the call a one-token
    # decoding step makes, so its result cannot depend on what else is in the forward.
    rows: list[slice | Tensor] | None = None
    linear: lin.LinearStep | None = None  # linear layers: slots read and masks (actors.linear_attention)


class BatchItem(NamedTuple):
    """One sequence's part of a batched forward (``Transformer.forward_batch``)."""
    tokens: Tensor  # long [T]
    cache: KVCache  # its own cache; the T new entries go at its length
    positions: Tensor | None = None
    tree_mask: Tensor | None = None
    prefill: bool = False  # a prompt chunk (attended as one batch, as ``forward_hidden`` does)


@dataclass
class Segment:
    """One sequence's new tokens in a forward: rows `rows` of the batch, written to its own
    cache from slot `start`, attending as its own plans say."""
    rows: slice
    cache: KVCache
    start: int
    plans: dict[str, _AttnPlan]
    step: SparseStep | None = None
    sums: list[Tensor | None] | None = None


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

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, start: int, plan: _AttnPlan,
                sparse: SparseStep | None, role: str, sums: Tensor | None) -> Tensor:
        """One sequence: q [H, T, D], k/v [Hkv, T, D] -> attention output [T, H * D]."""
        T, D = q.shape[1], self.head_dim
        q = q * plan.cos + rotate_half(q) * plan.sin
        k = k * plan.cos + rotate_half(k) * plan.sin
        end = start + T
        kc[:, start:end] = k
        vc[:, start:end] = v
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


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        """Parameters are allocated uninitialised; use ``from_hf`` to wrap real weights."""
        super().__init__()
        self.config = cfg = config
        self.tok_embeddings = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.quant_embedding: nn.Module | None = None  # a GGUF model's embedding blocks (actors.gguf_model)
        self._row_exact: bool | None = None  # decided on first use, once the linears are final
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.output = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings
        self._init_buffers()

    def _init_buffers(self, device: torch.device | str | None = None) -> None:
        cfg = self.config
        device = device if device is not None else self.device
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling).to(device),
                             persistent=False)
        local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        local_scaling = cfg.rope_scaling if cfg.rope_local_theta is None else None
        self.register_buffer("inv_freq_local", rope_inv_freq(local, cfg.head_dim, local_scaling).to(device),
                             persistent=False)
        scale = math.sqrt(cfg.hidden_size) if cfg.gemma else 1.0
        # Gemma scales embeddings by sqrt(hidden) rounded to the embedding dtype, as transformers does.
        self.register_buffer("embed_scale", torch.tensor(scale, device=device).to(self.dtype), persistent=False)

    @property
    def row_exact(self) -> bool:
        """True when every row of a forward is computed as it would be alone: all linears
        run row-independent kernels (the quantized ones), and attention then goes row by
        row. Verifying T tokens then gives bitwise the logits of T one-token steps, so greedy
        speculation equals decoding alone even at near-ties. Dense BLAS kernels change
        their summation order with the row count, so dense models are not row-exact."""
        if self._row_exact is None and self.config.linear is not None:
            self._row_exact = False  # linear layers sum the past in another order when verifying
        if self._row_exact is None:
            linears = [self.output] + [m for blk in self.layers for m in (
                blk.attn.wq, blk.attn.wk, blk.attn.wv, blk.attn.wo, blk.mlp.w_gate, blk.mlp.w_up, blk.mlp.w_down)]
            self._row_exact = all(getattr(m, "row_independent", False) for m in linears)
        return self._row_exact

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (float32 for quantized models)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(cls, hf_model) -> Transformer:
        """Wrap an HF *ForCausalLM's parameters (the very same tensors: zero copy)."""
        cfg = ModelConfig.from_hf(hf_model.config)
        base = hf_model.model
        base = getattr(base, "language_model", base)  # Gemma3ForConditionalGeneration
        with torch.device("meta"):
            model = cls(cfg)

        def take(module: nn.Module, name: str, hf_param: Tensor | None) -> None:
            mine = getattr(module, name)
            if (mine is None) != (hf_param is None):
                raise ValueError(f"parameter {name!r} of {type(module).__name__}: "
                                 f"{'missing in HF model' if hf_param is None else 'unexpected in HF model'}")
            if mine is None:
                return
            if tuple(mine.shape) != tuple(hf_param.shape):
                raise ValueError(f"shape mismatch for {name!r}: expected {tuple(mine.shape)}, "
                                 f"HF has {tuple(hf_param.shape)}")
            setattr(module, name, hf_param if isinstance(hf_param, nn.Parameter) else nn.Parameter(hf_param, False))

        def take_linear(mine: Linear, hf_lin: nn.Module) -> None:
            take(mine, "weight", hf_lin.weight)
            take(mine, "bias", getattr(hf_lin, "bias", None))

        take(model, "tok_embeddings", base.embed_tokens.weight)
        if len(base.layers) != cfg.n_layers:
            raise ValueError(f"HF model has {len(base.layers)} layers, config says {cfg.n_layers}")
        for blk, hl in zip(model.layers, base.layers):
            a, ha = blk.attn, hl.self_attn
            for mine, hf_name in ((a.wq, "q_proj"), (a.wk, "k_proj"), (a.wv, "v_proj"), (a.wo, "o_proj")):
                take_linear(mine, getattr(ha, hf_name))
            m, hm = blk.mlp, hl.mlp
            for mine, hf_name in ((m.w_gate, "gate_proj"), (m.w_up, "up_proj"), (m.w_down, "down_proj")):
                take_linear(mine, getattr(hm, hf_name))
            take(blk.attn_norm, "weight", hl.input_layernorm.weight)
            if cfg.gemma:
                take(a.q_norm, "weight", ha.q_norm.weight)
                take(a.k_norm, "weight", ha.k_norm.weight)
                take(blk.post_attn_norm, "weight", hl.post_attention_layernorm.weight)
                take(blk.mlp_norm, "weight", hl.pre_feedforward_layernorm.weight)
                take(blk.post_mlp_norm, "weight", hl.post_feedforward_layernorm.weight)
            else:
                take(blk.mlp_norm, "weight", hl.post_attention_layernorm.weight)
        take(model.norm, "weight", base.norm.weight)
        take(model.output, "weight", hf_model.lm_head.weight)
        if getattr(hf_model.lm_head, "bias", None) is not None:
            raise ValueError("lm_head with a bias is not supported")
        for p in model.parameters():
            if p.device.type == "meta":
                raise ValueError("a parameter was not provided by the HF model")
        model._init_buffers(model.device)
        model._adopt_hf_rope(base)
        return model.eval()

    def _adopt_hf_rope(self, base: nn.Module) -> None:
        """Use the HF model's own inverse frequencies when present (bit-identical RoPE)."""
        rot = getattr(base, "rotary_emb", None)
        pairs = (("inv_freq", "full_attention_inv_freq", "full_attention_attention_scaling"),
                 ("inv_freq_local", "sliding_attention_inv_freq", "sliding_attention_attention_scaling"))
        for mine, gemma_name, gemma_scaling in pairs:
            hf = getattr(rot, gemma_name if self.config.gemma else "inv_freq", None)
            scaling = getattr(rot, gemma_scaling if self.config.gemma else "attention_scaling", 1.0)
            if hf is None or hf.device.type == "meta" or hf.shape != getattr(self, mine).shape:
                continue
            if float(scaling) != 1.0:
                raise ValueError(f"RoPE attention scaling {scaling} is not supported")
            hf = hf.detach().float().to(self.device)
            if not torch.allclose(hf, getattr(self, mine), rtol=1e-2, atol=1e-6):
                raise ValueError(f"RoPE frequencies differ from the HF model's ({mine}); unsupported rope settings?")
            setattr(self, mine, hf.clone())

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def tune_kernels(self, threads: int | None = None, progress: bool = False) -> dict[str, list[str]]:
        """Pick each linear's kernel by measurement (cached per CPU); see ``actors.kernels``."""
        return kernels.tune(self.linears(), threads, progress)

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_len, dtype=self.dtype, device=self.device)
        if c.linear is not None:
            cache.linear = lin.LinearState()
        return cache

    def linearize(self, cfg: lin.LinearConfig) -> list[lin.LinearParams]:
        """Turn the layers `cfg` names into linearized attention (actors.linear_attention),
        with fresh feature maps (`loading.load_linear` loads trained ones); returns them.
        Changes `self.config` in place: a model sharing that config object changes too."""
        mc = self.config
        if mc.linear is not None:
            raise ValueError("this model is linearized already")
        if "sliding_attention" in mc.layer_types:
            raise ValueError(f"linearizing {mc.family} models with sliding-window layers is not supported")
        layers = cfg.linear_layers(mc.n_layers)
        added = []
        for i in layers:
            p = lin.LinearParams(cfg, mc.n_heads, mc.n_kv_heads, mc.head_dim).to(self.device)
            self.layers[i].attn.linear = p
            self.layers[i].layer_type = "linear_attention"
            added.append(p)
        mc.layer_types = tuple("linear_attention" if i in layers else t for i, t in enumerate(mc.layer_types))
        mc.linear = cfg
        self._row_exact = None
        return added

    def linear_params(self) -> dict[str, Tensor]:
        """The linearized layers' parameters by name (`layers.I.P`): what a linearized model ships."""
        return {f"layers.{i}.{n}": t for i, blk in enumerate(self.layers) if blk.attn.linear is not None
                for n, t in blk.attn.linear.named_parameters()}

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: KVCache, positions: Tensor | None = None,
                tree_mask: Tensor | None = None, last_only: bool = False, sparse: TidalConfig | None = None) -> Tensor:
        """Float32 logits [T, V] ([1, V] with ``last_only``) for T new tokens; see ``forward_hidden``."""
        h = self.forward_hidden(tokens, cache, positions, tree_mask, sparse)
        return self.logits(h[-1:] if last_only else h)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """lm_head (+ final softcapping) on final normed hidden states -> float32 [N, V]."""
        out = self.output(hidden)
        cap = self.config.final_logit_softcapping
        if cap:  # in the model dtype, as transformers does
            out = torch.tanh(out / cap) * cap
        return out.float()

    @torch.inference_mode()
    def forward_hidden(self, tokens: Tensor, cache: KVCache, positions: Tensor | None = None,
                       tree_mask: Tensor | None = None, sparse: TidalConfig | None = None,
                       prefill: bool = False) -> Tensor:
        """Run T new tokens; return the final normed hidden states [T, hidden].

        Writes their K/V at slots [cache.length, cache.length + T) and advances cache.length.
        ``positions`` (long [T]) are the RoPE positions, default cache.length + arange(T).
        ``tree_mask`` (bool [T, T], True = may attend) says which new tokens each new token
        sees, default causal; every new token also sees all of [0, cache.length).
        Sliding-window layers also hide keys with position_q - position_k >= window
        (cache slot i < cache.length is taken to hold position i).
        ``sparse``: TidalDecode attention (``actors.tidal``), an approximation, for forwards
        of at most ``MAX_SPARSE_TOKENS`` tokens over more than ``budget`` cached ones;
        otherwise, and always in its full and selection layers, attention is exact.
        ``prefill``: a chunk of a prompt, attended as one batch even on row-exact models (their
        row-by-row attention is for verifies, which must equal decoding steps; a prompt is
        prefilled the same way whatever decodes after it).
        """
        cfg = self.config
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        seg = self._segment(tokens, cache, positions, tree_mask, sparse, prefill, slice(None))
        x = self._run(tokens, [seg])
        cache.length = seg.start + tokens.shape[0]
        if cfg.linear and prefill:  # a prompt is committed: fold its whole groups now (snapshots keep them)
            self._linear_sums(cache, cfg.linear.group * (cache.length // cfg.linear.group))
        return self.norm(x)

    @torch.inference_mode()
    def forward_batch(self, batch: list[BatchItem]) -> list[Tensor]:
        """Several sequences in one forward: each item as ``forward_hidden`` takes it. The
        linears run once over all rows; each sequence attends over its own cache. Returns
        each sequence's final normed hidden states [T_i, hidden]. On a row-exact model every row equals the same
        sequence run alone, bitwise."""
        if not batch:
            raise ValueError("forward_batch needs at least one sequence")
        if self.config.linear is not None:
            raise ValueError("forward_batch does not run linearized models (their state folds per sequence)")
        segs, lo = [], 0
        for it in batch:
            n = it.tokens.numel()
            segs.append(self._segment(it.tokens, it.cache, it.positions, it.tree_mask, None, it.prefill,
                                      slice(lo, lo + n)))
            lo += n
        x = self._run(torch.cat([it.tokens.reshape(-1) for it in batch]), segs)
        hidden = self.norm(x)
        for it, seg in zip(batch, segs):
            it.cache.length = seg.start + it.tokens.numel()
        return [hidden[seg.rows] for seg in segs]

    def _segment(self, tokens: Tensor, cache: KVCache, positions: Tensor | None, tree_mask: Tensor | None,
                 sparse: TidalConfig | None, prefill: bool, rows: slice) -> Segment:
        """Check one sequence's inputs and plan how it attends (nothing written yet)."""
        cfg = self.config
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty long tensor [T], got shape {tuple(tokens.shape)}")
        if (cache.n_layers, cache.n_kv_heads, cache.head_dim) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim):
            raise ValueError(f"{cache!r} does not fit this model")
        T, start, dev = tokens.shape[0], cache.length, self.device
        cache.check_room(T)
        if positions is not None:
            if positions.shape != (T,):
                raise ValueError(f"positions must have shape [{T}], got {tuple(positions.shape)}")
            positions = positions.to(dev)
        if tree_mask is not None:
            if tree_mask.shape != (T, T):
                raise ValueError(f"tree_mask must have shape [{T}, {T}], got {tuple(tree_mask.shape)}")
            tree_mask = tree_mask.to(device=dev, dtype=torch.bool)
        plans = self._plans(T, start, positions, tree_mask, self.dtype, prefill)
        step = self._sparse_step(sparse, T, start, tree_mask)
        sums = self._linear_sums(cache, plans["linear_attention"].linear.boundary) if cfg.linear else None
        return Segment(rows, cache, start, plans, step, sums)

    def _run(self, tokens: Tensor, segs: list[Segment]) -> Tensor:
        """Embed the new tokens of every segment and run them through all layers."""
        ids = tokens.to(self.device)
        x = self.quant_embedding(ids) if self.quant_embedding is not None else F.embedding(ids, self.tok_embeddings)
        if self.config.gemma:
            x = x * self.embed_scale
        for i, blk in enumerate(self.layers):
            x = blk(x, i, segs)
        return x

    def _linear_sums(self, cache: KVCache, boundary: int) -> list[Tensor | None]:
        """Each linear layer's S over the committed slots [0, boundary), from the cache's checkpoints."""
        if cache.linear is None:
            raise ValueError("a linearized model needs a cache from its own new_cache()")
        params = [blk.attn.linear for blk in self.layers]

        def empty() -> list[Tensor | None]:
            return [None if p is None else lin.empty_sums(p, self.device) for p in params]

        def fold(sums: list[Tensor | None], lo: int, hi: int) -> list[Tensor | None]:
            return [None if p is None else lin.fold_group(p, s, cache.k[i, 0, :, lo:hi], cache.v[i, 0, :, lo:hi])
                    for i, (p, s) in enumerate(zip(params, sums))]

        return cache.linear.sums_at(boundary, self.config.linear.group, fold, empty)

    def check_sparse(self, sparse: TidalConfig) -> None:
        """Refuse a TidalDecode layout this model cannot run, naming why."""
        cfg = self.config
        if cfg.linear is not None:
            raise ValueError("tidal attention is not supported on a linearized model (its linear layers already "
                             "read a state of fixed size)")
        if "sliding_attention" in cfg.layer_types:
            raise ValueError(f"tidal attention is not supported on {cfg.family} models with sliding-window layers")
        if sparse.select_layers[-1] >= cfg.n_layers:
            raise ValueError(f"tidal selection layer {sparse.select_layers[-1]} is past this model's "
                             f"{cfg.n_layers} layers")

    def _sparse_step(self, sparse: TidalConfig | None, T: int, start: int,
                     tree_mask: Tensor | None) -> SparseStep | None:
        """Sparse attention applies to short forwards over a cache longer than the budget
        (with a budget >= the cache it would select everything: plain attention it is)."""
        if sparse is None or T > MAX_SPARSE_TOKENS or start <= sparse.budget:
            return None
        self.check_sparse(sparse)
        new_mask = None
        if T > 1:
            new = tree_mask if tree_mask is not None else torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
            g = self.config.n_heads // self.config.n_kv_heads
            new_mask = new.repeat(g, 1)
        return SparseStep(sparse, start, new_mask)

    def _plans(self, T: int, start: int, positions: Tensor | None, tree_mask: Tensor | None,
               dtype: torch.dtype, prefill: bool = False) -> dict[str, _AttnPlan]:
        """Masks and RoPE tables, built once per forward for each kind of layer."""
        cfg, dev, g = self.config, self.device, self.config.n_heads // self.config.n_kv_heads
        end = start + T
        pos = positions if positions is not None else torch.arange(start, end, device=dev)

        def rope(inv_freq: Tensor) -> tuple[Tensor, Tensor]:
            freqs = pos[:, None].float() * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)

        def new_part() -> Tensor:  # which new tokens each new token sees
            if tree_mask is not None:
                return tree_mask
            return torch.ones(T, T, dtype=torch.bool, device=dev).tril()

        def fold(mask: Tensor) -> Tensor:  # rows for the folded GQA query layout
            return mask.repeat(g, 1) if g > 1 else mask

        plans: dict[str, _AttnPlan] = {}
        kinds = set(cfg.layer_types)
        if "full_attention" in kinds:
            cos, sin = rope(self.inv_freq)
            if tree_mask is None and T == 1:
                plans["full_attention"] = _AttnPlan(0, None, False, cos, sin)
            elif tree_mask is None and start == 0:
                plans["full_attention"] = _AttnPlan(0, None, True, cos, sin)
            else:
                m = torch.ones(T, end, dtype=torch.bool, device=dev)
                m[:, start:] = new_part()
                plans["full_attention"] = _AttnPlan(0, fold(m), False, cos, sin)
        if "sliding_attention" in kinds:
            w = cfg.sliding_window
            cos, sin = rope(self.inv_freq_local)
            if positions is None:
                pmin, pmax = start, end - 1
            else:
                pmin, pmax = (int(v) for v in torch.stack(positions.aminmax()).tolist())
            # committed slots below lo are out of every query's window (slot i holds position i)
            lo = min(max(0, pmin - w + 1), start)
            in_window = pmax - lo < w  # every attended key is within every query's window
            if in_window and tree_mask is None and T == 1:
                plan = _AttnPlan(lo, None, False, cos, sin)
            elif in_window and tree_mask is None and start == 0:
                plan = _AttnPlan(0, None, True, cos, sin)
            else:
                plan = None
            if plan is None:
                m = torch.ones(T, end - lo, dtype=torch.bool, device=dev)
                m[:, start - lo:] = new_part()
                if not in_window:
                    kpos = torch.cat((torch.arange(lo, start, device=dev), pos))
                    m &= (pos[:, None] - kpos[None, :]) < w
                plan = _AttnPlan(lo, fold(m), False, cos, sin)
            plans["sliding_attention"] = plan
        if "linear_attention" in kinds:
            cos, sin = rope(self.inv_freq)
            plans["linear_attention"] = _AttnPlan(0, None, False, cos, sin,
                                                  linear=lin.plan_step(cfg.linear, start, pos, tree_mask))
        # a fresh prefill is the same call either way
        if self.row_exact and not prefill and not (tree_mask is None and start == 0 and T > 1):
            visible = new_part().tolist()
            for kind, plan in plans.items():
                window = cfg.sliding_window if kind == "sliding_attention" else None
                plan.rows = self._row_slots(start, pos.tolist(), visible, window)
        return plans

    @staticmethod
    def _row_slots(start: int, pos: list[int], visible: list[list[bool]], window: int | None) -> list[slice | Tensor]:
        """For each new token, the cache slots it attends to, in slot order: the committed
        slots [0, start) (those in its window), then the new tokens it may see. A decoding
        step sees the same keys in the same order, as one contiguous slice."""
        rows: list[slice | Tensor] = []
        for r, p in enumerate(pos):
            lo = 0 if window is None else max(0, p - window + 1)
            prefix = range(min(lo, start), start)
            new = [start + j for j, seen in enumerate(visible[r]) if seen and (window is None or p - pos[j] < window)]
            first = prefix.start if prefix else new[0]
            if new == list(range(start if prefix else first, new[-1] + 1)):  # no gap: one slice, as decoding has
                rows.append(slice(first, new[-1] + 1))
            else:
                rows.append(torch.tensor([*prefix, *new]))
        return rows
