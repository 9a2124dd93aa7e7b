"""Build our Transformer straight from a GGUF file, keeping the file's quantization.

Every 2-D weight stored in a block type the native kernels compute on (Q4_0, Q5_0, Q8_0,
Q4_K, Q6_K) becomes a `QuantLinear` over the file's own bytes; the token embedding
becomes a `QuantEmbedding` (and the tied output projection shares its blocks). Norms,
biases and anything in F32/F16/BF16 load as float32; other block types (Q2_K, Q5_K, IQ*,
...) are dequantized with gguf-py and run dense, with a warning.

The file's layout follows llama.cpp's converter, undone here as transformers does:
llama's q/k rows are permuted for its RoPE (a row permutation, so it is undone on the
quantized rows too), and Gemma stores its norm weights plus one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from actors import native
from actors.layers import Linear
from actors.model import Transformer
from actors.model_config import ModelConfig
from actors.quantized import QuantEmbedding, QuantLinear, QuantWeight

log = logging.getLogger(__name__)

DENSE_TYPES = {0: np.float32, 1: np.float16, 30: "bf16"}  # GGML F32, F16, BF16

# GGUF tensor name (per layer, after "blk.N.") -> our module path under layers[N]
LAYER_NAMES = {
    "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv", "attn_output": "attn.wo",
    "ffn_gate": "mlp.w_gate", "ffn_up": "mlp.w_up", "ffn_down": "mlp.w_down",
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
    "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",  # gemma3
    "post_attention_norm": "post_attn_norm", "post_ffw_norm": "post_mlp_norm",  # gemma3
}


def load(gguf_path: str | Path, hf_config) -> Transformer:
    """Our Transformer for the GGUF file at `gguf_path`, whose model `hf_config` describes."""
    import gguf

    cfg = ModelConfig.from_hf(hf_config)
    reader = gguf.GGUFReader(str(gguf_path))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.register_parameter("tok_embeddings", None)
    for t in reader.tensors:
        path, what = _module_for(t.name, cfg)
        if path is None:
            log.info("GGUF tensor %s not used", t.name)
            continue
        owner = model.get_submodule(path) if path else model
        if what == "embedding":
            _set_embedding(model, t)
        elif what == "weight" and isinstance(owner, Linear):
            parent, name = _parent(model, path)
            setattr(parent, name, _linear(t, owner, cfg, path))
        elif what == "bias":
            lin = model.get_submodule(path)
            values = _dense(t, (lin.out_features if isinstance(lin, QuantLinear) else lin.weight.shape[0],))
            lin.bias = nn.Parameter(_unpermute(values, path, cfg), requires_grad=False)
        else:  # a norm weight
            values = _dense(t, tuple(owner.weight.shape))
            if cfg.gemma:
                values = values - 1.0  # stored as 1 + w
            owner.weight = nn.Parameter(values, requires_grad=False)
    if isinstance(model.output, Linear) and model.output.weight.device.type == "meta":
        if not cfg.tie_word_embeddings:
            log.info("no output.weight in the GGUF: tying it to the token embedding, as llama.cpp does")
        model.output = _tied_output(model)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, m in model.named_modules() if isinstance(m, Linear) and m.weight.device.type == "meta"]
    if missing:
        raise ValueError(f"{gguf_path}: the file has no tensor for {sorted(set(missing))[:5]}")
    model._init_buffers(torch.device("cpu"))
    return model.eval()


def _module_for(name: str, cfg: ModelConfig) -> tuple[str | None, str]:
    if name == "token_embd.weight":
        return "", "embedding"
    if name == "output_norm.weight":
        return "norm", "weight"
    if name == "output.weight":
        return "output", "weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES and parts[3] in ("weight", "bias"):
        layer = int(parts[1])
        if layer >= cfg.n_layers:
            raise ValueError(f"GGUF tensor {name}: the config has {cfg.n_layers} layers")
        return f"layers.{layer}.{LAYER_NAMES[parts[2]]}", parts[3]
    return None, ""


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, name = path.rpartition(".")
    return (model.get_submodule(head) if head else model), name


def _dense(t, shape: tuple[int, ...]) -> torch.Tensor:
    import gguf

    kind = DENSE_TYPES.get(int(t.tensor_type))
    if kind == "bf16":
        data = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).float()
    elif kind is not None:
        data = torch.from_numpy(np.array(t.data, dtype=np.float32))
    else:
        data = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    if data.numel() != int(np.prod(shape)):
        raise ValueError(f"GGUF tensor {t.name}: {data.numel()} values, expected shape {list(shape)}")
    return data.reshape(shape).contiguous()


def _row_order(path: str, cfg: ModelConfig, n: int) -> torch.Tensor | None:
    """llama's converter permutes q/k rows (per head: interleaved halves); the inverse order."""
    if cfg.family != "llama" or not path.endswith(("attn.wq", "attn.wk")):
        return None
    heads = cfg.n_heads if path.endswith("wq") else cfg.n_kv_heads
    idx = torch.arange(n)
    return idx.reshape(heads, n // heads // 2, 2).transpose(1, 2).reshape(n)  # row (h, j, i) <- (h, i, j)


def _unpermute(values: torch.Tensor, path: str, cfg: ModelConfig) -> torch.Tensor:
    order = _row_order(path, cfg, values.shape[0])
    return values if order is None else values[order].contiguous()


def _linear(t, like: Linear, cfg: ModelConfig, path: str) -> nn.Module:
    n, k = like.weight.shape
    if (int(t.shape[0]), int(t.shape[1]) if len(t.shape) > 1 else 1) != (k, n):
        raise ValueError(f"GGUF tensor {t.name} has shape {list(t.shape)}, the config expects [{k}, {n}]")
    qtype = int(t.tensor_type)
    bias = like.bias if like.bias is not None and like.bias.device.type != "meta" else None
    if qtype in native.BLOCKS and native.available():
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(n, -1))
        order = _row_order(path, cfg, n)
        if order is not None:
            blocks = blocks[order].contiguous()
        return QuantLinear(QuantWeight(blocks, qtype, n, k), bias)
    if qtype not in DENSE_TYPES:
        _warn_dense(t)
    dense = Linear(k, n, bias=like.bias is not None)
    dense.weight = nn.Parameter(_unpermute(_dense(t, (n, k)), path, cfg), requires_grad=False)
    if bias is not None:
        dense.bias = bias
    return dense


def _set_embedding(model: Transformer, t) -> None:
    cfg = model.config
    v, d = cfg.vocab_size, cfg.hidden_size
    qtype = int(t.tensor_type)
    if qtype in native.BLOCKS and native.available():
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(v, -1))
        model.quant_embedding = QuantEmbedding(QuantWeight(blocks, qtype, v, d))
    else:
        if qtype not in DENSE_TYPES:
            _warn_dense(t)
        model.tok_embeddings = nn.Parameter(_dense(t, (v, d)), requires_grad=False)


def _tied_output(model: Transformer) -> nn.Module:
    if model.quant_embedding is not None:
        return QuantLinear(model.quant_embedding.qweight)  # the same blocks: no second copy
    out = Linear(model.config.hidden_size, model.config.vocab_size)
    out.weight = model.tok_embeddings
    return out


def _warn_dense(t) -> None:
    log.warning("GGUF tensor %s is %s, which the native kernels do not compute on: dequantized to float32",
                t.name, getattr(t.tensor_type, "name", t.tensor_type))
