"""Stage 1 of `specray linearize`: which text trains the linearized layers and which is
held out, tokenized into chunks of exactly --seq tokens.

The split is by document (every 10th stdlib file and reference-docs topic), never by
chunk, and the held-out documents are listed in the work directory and in linear.json:
benchmarks/linear_quality.py reads them back through `heldout_texts` to measure a
linearized model only on text its training never saw.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

from training.checkpoint import atomic_json
from training.config import LinearizeConfig
from training.heads_data import stdlib_files

HELDOUT_EVERY = 10  # every 10th stdlib file / docs topic is held out
PROSE_SHARE = 0.25  # of the training chunks: English prose (the reference docs), the rest code


# ---- text sources ---------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_documents(seed: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out) stdlib files, in a seeded order; every 10th held out."""
    files = stdlib_files(seed)
    return ([f for i, f in enumerate(files) if i % HELDOUT_EVERY],
            [f for i, f in enumerate(files) if i % HELDOUT_EVERY == 0])


def prose_documents(seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) topic names of the Python reference docs, in a seeded order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    return ([n for i, n in enumerate(names) if i % HELDOUT_EVERY],
            [n for i, n in enumerate(names) if i % HELDOUT_EVERY == 0])


def heldout_texts(heldout: dict) -> dict[str, list[tuple[str, str]]]:
    """The held-out documents a linear.json / work dir lists -> {"code"|"prose": [(name, text)]}."""
    from pydoc_data.topics import topics

    root = stdlib_root()
    code = [(p, (root / p).read_text(errors="replace")) for p in heldout.get("code", []) if (root / p).is_file()]
    prose = [(n, topics[n]) for n in heldout.get("prose", []) if n in topics]
    return {"code": code, "prose": prose}


def _stream(texts, tokenizer, budget: int) -> list[int]:
    """Documents tokenized one after another (blank line between) until `budget` tokens."""
    ids: list[int] = []
    for text in texts:
        if len(ids) >= budget:
            break
        if text.strip():
            ids += tokenizer(text.rstrip() + "\n\n")["input_ids"]
    return ids[:budget]


def _cut(ids: list[int], seq: int) -> list[list[int]]:
    return [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]


# ---- 1. chunks ------------------------------------------------------------------------------


def build_chunks(cfg: LinearizeConfig, tokenizer) -> dict:
    """Train and held-out chunks of exactly --seq tokens (chunks.json), and the held-out
    document list."""
    path = cfg.work / "chunks.json"
    if path.is_file():
        return json.loads(path.read_text())
    code_train, code_held = code_documents(cfg.seed)
    prose_train, prose_held = prose_documents(cfg.seed)
    from pydoc_data.topics import topics

    n = max(1, cfg.tokens // cfg.seq)
    n_prose = round(n * PROSE_SHARE) if n > 1 else 0
    n_code = n - n_prose
    files = (f.read_text(errors="replace") for f in code_train)
    code = _cut(_stream(files, tokenizer, n_code * cfg.seq), cfg.seq)
    prose = _cut(_stream((topics[t] for t in prose_train), tokenizer, n_prose * cfg.seq), cfg.seq)
    train = code + prose
    random.Random(cfg.seed).shuffle(train)  # a short run still sees both kinds
    # held out for the training's own evaluation: a tenth as many chunks, both kinds
    n_eval = max(2, n // HELDOUT_EVERY)
    files = (f.read_text(errors="replace") for f in code_held)
    heldout = (_cut(_stream(files, tokenizer, (n_eval - n_eval // 2) * cfg.seq), cfg.seq)
               + _cut(_stream((topics[t] for t in prose_held), tokenizer, (n_eval // 2) * cfg.seq), cfg.seq))
    root = stdlib_root()
    data = {"train": train, "heldout": heldout, "train_code_chunks": len(code), "train_prose_chunks": len(prose),
            "heldout_docs": {"code": [str(f.relative_to(root)) for f in code_held], "prose": prose_held}}
    atomic_json(path, data)
    return data
