"""Tiny random models for tests, written as ordinary Hugging Face directories.

They are loaded through the same `loading.load` path as every real model. A draft is made
from its target's weights plus seeded noise, so a tiny pair agrees often but not always:
the interesting case for speculation.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

FAMILIES = ("qwen2", "llama", "gemma3")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_config(family: str, vocab_size: int, initializer_range: float = 0.02, hidden_size: int = 64,
                intermediate_size: int = 128, max_position_embeddings: int = 512, num_hidden_layers: int = 2):
    import transformers as tf

    common = dict(
        initializer_range=initializer_range,
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, eos_token_id=1, bos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False,
    )
    if family == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=num_hidden_layers, **common)
    if family == "llama":
        return tf.LlamaConfig(num_hidden_layers=num_hidden_layers, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def char_tokenizer(vocab_size: int):
    """A character-level tokenizer: id 0 unknown, id 1 end of sequence, then characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = string.ascii_lowercase + " .,:;!?()=+-*/_'\"\n" + string.digits + string.ascii_uppercase
    chars = alphabet[: max(0, vocab_size - 2)]
    vocab = {"<unk>": 0, "</s>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    vocab |= {f"<extra_{i}>": i for i in range(len(vocab), vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny(path: str | Path, family: str = "qwen2", vocab_size: int = 64, seed: int = 0,
              noise: float = 0.0, initializer_range: float = 0.02, **sizes) -> Path:
    """Write a seeded random model to `path` (skipped if already there). `noise` > 0 perturbs
    every weight by that fraction of its own scale: a cheap stand-in for a trained draft.
    A larger `initializer_range` gives peakier next-token distributions."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, initializer_range, **sizes),
                                             dtype=torch.float32)
    if noise > 0:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    model.save_pretrained(path)
    char_tokenizer(vocab_size).save_pretrained(path)
    return path


# ---- tiny GGUF models: random blocks of chosen types, laid out as llama.cpp writes them ----
GGUF_ARCH = {"qwen2": "qwen2", "llama": "llama", "gemma3": "gemma3"}


def make_tiny_gguf(path: str | Path, family: str = "qwen2", linear_type: str = "Q8_0", embed_type: str = "Q8_0",
                   seed: int = 0, **tiny_kw) -> Path:
    """A directory with a tiny model's config and tokenizer and a `model.gguf` whose
    linears are random `linear_type` blocks (scaled like small weights), embedding
    `embed_type`, norms and biases F32, named and laid out as llama.cpp's converter does
    (llama q/k rows permuted, Gemma norms stored as 1 + w). K-quants (Q4_K, Q6_K) need
    hidden and intermediate sizes that are multiples of 256: pass hidden_size=256, ...
    Skipped if `path` already holds one."""
    import shutil

    import gguf
    import numpy as np
    from transformers import AutoConfig

    path = Path(path)
    if (path / "model.gguf").is_file():
        return path
    src = make_tiny(path.with_name(path.name + "-hf"), family, seed=seed, **tiny_kw)
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    cfg = AutoConfig.from_pretrained(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path / "model.gguf.partial"), GGUF_ARCH[family])
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.hidden_size), "output_norm.weight": (cfg.hidden_size,)}
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_q.weight": (cfg.num_attention_heads * hd, cfg.hidden_size),
                   b + "attn_k.weight": (cfg.num_key_value_heads * hd, cfg.hidden_size),
                   b + "attn_v.weight": (cfg.num_key_value_heads * hd, cfg.hidden_size),
                   b + "attn_output.weight": (cfg.hidden_size, cfg.num_attention_heads * hd),
                   b + "ffn_gate.weight": (cfg.intermediate_size, cfg.hidden_size),
                   b + "ffn_up.weight": (cfg.intermediate_size, cfg.hidden_size),
                   b + "ffn_down.weight": (cfg.hidden_size, cfg.intermediate_size),
                   b + "attn_norm.weight": (cfg.hidden_size,), b + "ffn_norm.weight": (cfg.hidden_size,)}
        if family == "qwen2":
            for n in ("q", "k", "v"):
                shapes[b + f"attn_{n}.bias"] = (shapes[b + f"attn_{n}.weight"][0],)
        if family == "gemma3":
            shapes |= {b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,),
                       b + "post_attention_norm.weight": (cfg.hidden_size,),
                       b + "post_ffw_norm.weight": (cfg.hidden_size,)}
    for name, shape in shapes.items():
        if len(shape) == 1:
            values = rng.normal(0.0, 0.1, shape).astype(np.float32)
            if name.endswith("norm.weight"):
                values += 1.0  # norms near 1 (Gemma's stored 1 + w: near 1 too)
            writer.add_tensor(name, values)
            continue
        qtype = gguf.GGMLQuantizationType[embed_type if name.startswith("token_embd") else linear_type]
        if shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:  # as llama.cpp does for rows K-quants cannot hold
            qtype = gguf.GGMLQuantizationType.Q8_0
        # q and k large enough that attention is sharp: a wrong q/k row order must show
        scale = 0.4 if ".attn_q." in name or ".attn_k." in name else 0.05
        writer.add_tensor(name, random_blocks(rng, qtype, *shape, weight_scale=scale), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (path / "model.gguf.partial").rename(path / "model.gguf")
    return path


def random_blocks(rng, qtype, n: int, k: int, weight_scale: float = 0.05):
    """Valid GGUF blocks of `qtype` for an [n, k] weight: random codes, scales chosen so the
    weights are about `weight_scale` in size."""
    import gguf
    import numpy as np

    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n * (k // size), nbytes), dtype=np.uint8)
    t = gguf.GGMLQuantizationType
    code_range = {t.Q8_0: 127, t.Q4_0: 8, t.Q5_0: 16, t.Q4_K: 15 * 40, t.Q6_K: 32 * 60}[qtype]
    d = (weight_scale / code_range * rng.uniform(0.5, 1.5, len(blocks))).astype(np.float16)
    at = {t.Q4_K: (0, 2), t.Q6_K: (208,)}.get(qtype, (0,))
    for offset in at:
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
    if qtype == t.Q6_K:  # int8 scales: keep them positive and moderate
        blocks[:, 192:208] = rng.integers(20, 100, size=(len(blocks), 16), dtype=np.uint8)
    if qtype == t.Q4_K:  # 6-bit scales mid-range, mins small
        blocks[:, 4:16] = rng.integers(0, 256, size=(len(blocks), 12), dtype=np.uint8) & 0x9F
    return blocks.reshape(n, -1)


def make_tiny_heads(path: str | Path, model_dir: str | Path, n_heads: int = 3, hot_vocab: int | None = None,
                    seed: int = 0, scale: float = 1.0, kind: str = "medusa") -> Path:
    """Seeded random heads (`medusa` or `amphista`) for a tiny model: confident enough that
    trees vary, wrong often enough that rejections happen. Hot vocab: the lowest ids."""
    from transformers import AutoConfig

    from actors.head_kinds import make_heads
    from actors.heads import HeadsConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    vocab = cfg.vocab_size
    heads_cfg = HeadsConfig(kind, str(model_dir), cfg.hidden_size, vocab, n_heads=n_heads,
                            hot_vocab=hot_vocab or vocab, width=32)
    g = torch.Generator().manual_seed(seed)
    heads = make_heads(heads_cfg, torch.arange(heads_cfg.hot_vocab), torch.zeros(heads_cfg.hot_vocab, cfg.hidden_size))
    with torch.no_grad():
        for name, p in heads.trained().items():
            if p.dim() == 1:
                p.normal_(0.0, 0.1, generator=g)
            else:
                p.normal_(0.0, scale / p.shape[-1] ** 0.5, generator=g)
    heads.save(path)
    return Path(path)


def make_tiny_linear(path: str | Path, base: str | Path, group: int = 4, features: int = 8, conv: int = 3,
                     seed: int = 0, scale: float = 0.3) -> Path:
    """A linearized tiny model: `base` (a tiny model's directory) with seeded random feature
    maps, gains and convolution (`scale` off the initial values), written as `specray
    linearize` writes one (linear.json naming the base, linear.safetensors)."""
    import json

    from safetensors.torch import save_file

    from actors import loading
    from actors.linear_attention import LINEAR_CONFIG, LINEAR_FILE, LinearConfig

    path = Path(path)
    if (path / LINEAR_CONFIG).is_file():
        return path
    model = loading.load(str(base), "float32", progress=False).build()
    cfg = LinearConfig(group=group, features=features, conv=conv)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.linearize(cfg):
            for t in p.parameters():
                t.add_(torch.randn(t.shape, generator=gen) * scale)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.linear_params().items()}, path / LINEAR_FILE)
    (path / LINEAR_CONFIG).write_text(json.dumps({"base": str(base), **cfg.to_dict()}))
    return path
