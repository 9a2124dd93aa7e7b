"""Load models: a built-in, local directory or hub id (found by `actors.builtins`) into
our `Transformer` on the HF weights, with its tokenizer and config; GGUF files; the checks
that two models share a vocabulary.

A built-in is converted once with transformers' GGUF loader and cached on disk as an
ordinary Hugging Face directory (safetensors), so every later load is a plain
`from_pretrained` of local files. Tiny random models for tests go through the same path:
they are written as a Hugging Face directory first, then loaded like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# What other modules have always found here: where models live (actors.builtins) and the cache.
from actors.builtins import (  # noqa: F401
    BUILTIN_LINEAR_ROOT,
    BUILTINS,
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    DOWNLOAD_ENV,
    GGUF_NAME,
    LINEAR_BUILTINS,
    ModelNotFoundError,
    ensure_converted,
    linear_base,
    linear_dir,
    resolve,
)
from actors.paths import CACHE_ENV, cache_root, file_lock  # noqa: F401


@dataclass
class LoadedModel:
    """A model ready to wrap: its config and tokenizer, and either the Hugging Face model
    (dense precisions: our Transformer shares its tensors) or our Transformer built
    directly (quantized precisions)."""

    name: str
    path: Path | str
    config: object  # the Hugging Face config
    tokenizer: object
    precision: str  # float32 | bfloat16 | float16 | int8 | int4 | gguf
    hf_model: torch.nn.Module | None = None
    transformer: torch.nn.Module | None = None
    eos_token_ids: tuple[int, ...] = ()
    linear: Path | None = None  # a linearized model's own parameters (actors.linear_attention)

    @property
    def vocab_size(self) -> int:
        return self.config.get_text_config().vocab_size

    @property
    def context_length(self) -> int:
        return context_length(self.config)

    def build(self):
        """Our Transformer for this model (wrapping the HF model's tensors when dense)."""
        from actors.model import Transformer

        model = self.transformer if self.transformer is not None else Transformer.from_hf(self.hf_model)
        if self.linear is not None and model.config.linear is None:
            load_linear(model, self.linear)
        return model


def load_linear(model, directory: Path) -> None:
    """Linearize `model` as `directory` says (linear.json) with its trained parameters."""
    from safetensors.torch import load_file

    from actors.linear_attention import LINEAR_CONFIG, LINEAR_FILE, LinearConfig

    cfg = LinearConfig.from_dict(json.loads((directory / LINEAR_CONFIG).read_text()))
    added = model.linearize(cfg)
    state = load_file(directory / LINEAR_FILE)
    mine = model.linear_params()
    missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or extra:
        raise ValueError(f"{directory / LINEAR_FILE} does not fit this model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    with torch.no_grad():
        for key, t in mine.items():
            if t.shape != state[key].shape:
                raise ValueError(f"{directory / LINEAR_FILE}: {key} has shape {tuple(state[key].shape)}, "
                                 f"the model needs {tuple(t.shape)}")
            t.copy_(state[key].to(t.dtype))
    for p in added:
        p.requires_grad_(False)


def context_length(config) -> int:
    return int(getattr(config.get_text_config(), "max_position_embeddings", 2048))


def read_config(name: str):
    """The model's Hugging Face config, without loading weights (no fp32 conversion either)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_local_path(name))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_local_path(name))


def _local_path(name: str) -> Path | str:
    name = linear_base(name)
    path = resolve(name)
    if name in BUILTINS:
        path = ensure_converted(name, dense=False)
    return path


def gguf_file(name: str) -> Path | None:
    """The GGUF file behind `name`: a built-in's (as shipped), or the one .gguf file in a
    local model directory; None when there is none."""
    name = linear_base(name)
    if name in BUILTINS:
        return ensure_converted(name, dense=False) / GGUF_NAME
    path = Path(name).expanduser()
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}); keep one")
    return found[0] if found else None


def dtype_choice(name: str, requested: str, device: str = "cpu") -> tuple[str, str]:
    """What `--dtype requested` (`file` or `auto`: a choice made for the user) resolves to
    for model `name`, and one line saying what was chosen and why."""
    from actors import native
    from actors.hardware import resolve_dtype

    has_gguf = gguf_file(name) is not None
    precision = resolve_dtype(requested, device, has_gguf=requested in ("file", "auto", "gguf") and has_gguf)
    if precision == "gguf":
        why = (f"its GGUF file as the file is quantized, on the native {native.variant()} kernels: the fastest "
               "lossless form here, as llama.cpp runs it; --dtype float32 decodes its dense conversion")
    elif has_gguf:
        why = f"{precision} (dense conversion of its GGUF file: no native GGUF kernels here, or as asked)"
    else:
        why = f"{precision} (its weights are dense)"
    return precision, f"{name}: --dtype {requested} -> {why}"


def check_gguf(name: str, dtype: str, flag: str) -> None:
    """`gguf` keeps a GGUF file's own quantization: refuse it, before loading, for a model without one."""
    if dtype == "gguf" and gguf_file(name) is None:
        raise ValueError(f"{flag} gguf keeps a GGUF file's own quantization, and model {name!r} has no .gguf "
                         "file; use int8 or int4 (quantized here), or a dense dtype")


def load(name: str, dtype: str = "float32", progress: bool = True, device: str = "cpu") -> LoadedModel:
    """Load `name` in precision `dtype` (a --dtype name, `auto` included), as it resolves
    on `device` (`actors.hardware.resolve_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from actors.hardware import DTYPES, QUANTIZED, resolve_dtype

    if linear_dir(name) is not None:
        loaded = load(linear_base(name), dtype, progress, device)
        loaded.name, loaded.linear = name, linear_dir(name)
        return loaded
    precision = resolve_dtype(dtype, device, has_gguf=dtype in ("file", "auto", "gguf") and gguf_file(name) is not None)
    path = _local_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = read_config(name)
    if precision == "gguf":
        from actors import gguf_model

        check_gguf(name, precision, "dtype")
        hf_model, transformer = None, gguf_model.load(gguf_file(name), config)
    elif precision in QUANTIZED:
        from actors.model import Transformer
        from actors.quantized import quantize_linears

        if name in BUILTINS:
            ensure_converted(name, progress=progress)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hf_model, transformer = None, quantize_linears(Transformer.from_hf(hf), precision)
        del hf
    elif precision in DTYPES:
        if name in BUILTINS:
            ensure_converted(name, progress=progress)
        hf_model, transformer = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision]).eval(), None
    else:
        raise ValueError(f"unknown precision {precision!r}")
    try:
        ids = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        ids = getattr(config.get_text_config(), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    eos = () if ids is None else tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)
    return LoadedModel(name, path, config, tokenizer, precision, hf_model, transformer, eos)


def eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    return loaded.eos_token_ids


def check_same_vocab(target_tok, draft_tok, target_vocab: int, draft_vocab: int, names: tuple[str, str]) -> None:
    """Speculation compares token ids, so both models must mean the same thing by every id."""
    t, d = names
    if target_vocab != draft_vocab:
        raise ValueError(
            f"draft {d!r} has a vocabulary of {draft_vocab} tokens but target {t!r} has {target_vocab}; "
            "speculative decoding needs the same tokenizer"
        )
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise ValueError(f"draft {d!r} and target {t!r} use different tokenizers (token-to-id maps differ)")
