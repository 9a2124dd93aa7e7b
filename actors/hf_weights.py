"""Our Transformer on an already-loaded Hugging Face model: its very parameters (no copy),
matched name by name and shape by shape, and its own RoPE tables. Apart from the model
so the forward (`actors.model`) reads free of HF's naming, and so every place where HF's
layout and ours must agree is checked here, failing with the name of what differs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from actors.layers import Linear
from actors.model_config import ModelConfig


def wrap_hf(cls: type[nn.Module], hf_model) -> nn.Module:
    """A `cls` (a Transformer class) on an HF *ForCausalLM's parameters (the very same
    tensors: zero copy)."""
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
    adopt_hf_rope(model, base)
    return model.eval()


def adopt_hf_rope(model: nn.Module, base: nn.Module) -> None:
    """Use the HF model's own inverse frequencies when present (bit-identical RoPE)."""
    rot = getattr(base, "rotary_emb", None)
    pairs = (("inv_freq", "full_attention_inv_freq", "full_attention_attention_scaling"),
             ("inv_freq_local", "sliding_attention_inv_freq", "sliding_attention_attention_scaling"))
    for mine, gemma_name, gemma_scaling in pairs:
        hf = getattr(rot, gemma_name if model.config.gemma else "inv_freq", None)
        scaling = getattr(rot, gemma_scaling if model.config.gemma else "attention_scaling", 1.0)
        if hf is None or hf.device.type == "meta" or hf.shape != getattr(model, mine).shape:
            continue
        if float(scaling) != 1.0:
            raise ValueError(f"RoPE attention scaling {scaling} is not supported")
        hf = hf.detach().float().to(model.device)
        if not torch.allclose(hf, getattr(model, mine), rtol=1e-2, atol=1e-6):
            raise ValueError(f"RoPE frequencies differ from the HF model's ({mine}); unsupported rope settings?")
        setattr(model, mine, hf.clone())
