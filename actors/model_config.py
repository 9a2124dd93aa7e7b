"""What a model is: its family, sizes, layer kinds and RoPE, read from a Hugging Face config.

Refuses what the model code cannot run (an unknown family, RoPE type or activation) when
the config is read, before any weights load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from actors import linear_attention as lin

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
