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


def tiny_config(family: str, vocab_size: int, initializer_range: float = 0.02):
    import transformers as tf

    common = dict(
        initializer_range=initializer_range,
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=1, bos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False,
    )
    if family == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=2, **common)
    if family == "llama":
        return tf.LlamaConfig(num_hidden_layers=2, **common)
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
              noise: float = 0.0, initializer_range: float = 0.02) -> Path:
    """Write a seeded random model to `path` (skipped if already there). `noise` > 0 perturbs
    every weight by that fraction of its own scale: a cheap stand-in for a trained draft.
    A larger `initializer_range` gives peakier next-token distributions."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, initializer_range), dtype=torch.float32)
    if noise > 0:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    model.save_pretrained(path)
    char_tokenizer(vocab_size).save_pretrained(path)
    return path
