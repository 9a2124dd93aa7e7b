"""Stages 1 and 2 of `specray train-heads`: the text the heads learn from, the target's own
greedy answers to Spec-Bench prompts and Python standard-library sources, cut into chunks.

The target's answers, not human text, because the heads are to predict what the target
says; the categories the benchmarks decode are never asked, so no benchmark measures
heads trained on its own prompts. Both stages are cached in the work directory: answers
are appended per batch and a crash costs at most the line it cut short.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

import torch
from tqdm import tqdm

from training.checkpoint import atomic_json
from training.config import TrainConfig

EXCLUDED_CATEGORIES = ("coding", "math", "math_reasoning")  # what the benchmarks decode: never trained on


# ---- 1. answers ----------------------------------------------------------------------------


def _questions(cfg: TrainConfig) -> list[dict]:
    if not cfg.questions.is_file():
        print(f"train-heads: no Spec-Bench questions at {cfg.questions}; training on source code only")
        return []
    rows = [json.loads(line) for line in cfg.questions.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("category") not in EXCLUDED_CATEGORIES and r.get("turns")]


def generate_answers(cfg: TrainConfig, hf_model, tokenizer, limit_tokens: int = 1024) -> Path:
    """The target's greedy answers, appended per batch to answers.jsonl (resumable)."""
    path = cfg.work / "answers.jsonl"
    done = {row["question_id"] for row in read_answers(path)}
    todo = []
    for q in _questions(cfg):
        if q["question_id"] in done:
            continue
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) <= limit_tokens:  # long documents (rag, summarization) cost minutes of prefill each
            todo.append((q["question_id"], ids))
    todo.sort(key=lambda t: (len(t[1]), t[0]))  # similar lengths batch with little padding
    eos_ids = hf_model.generation_config.eos_token_id
    eos = set(eos_ids) if isinstance(eos_ids, list) else {eos_ids} - {None}
    pad = min(eos) if eos else 0  # masked out; an end-of-sequence id always lies inside the vocabulary
    bar = tqdm(total=len(todo), desc="answers (target, greedy)", unit="prompt")
    for i in range(0, len(todo), cfg.answer_batch):
        batch = todo[i:i + cfg.answer_batch]
        width = max(len(ids) for _, ids in batch)
        inputs = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch])
        with torch.inference_mode():
            out = hf_model.generate(inputs, attention_mask=mask, max_new_tokens=cfg.answer_tokens,
                                    do_sample=False, pad_token_id=pad)
        with path.open("a") as f:
            for (qid, ids), row in zip(batch, out[:, width:].tolist()):
                answer = []
                for t in row:
                    answer.append(t)
                    if t in eos:
                        break
                f.write(json.dumps({"question_id": qid, "prompt_ids": ids, "answer_ids": answer}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        bar.update(len(batch))
    bar.close()
    return path


def read_answers(path: Path) -> list[dict]:
    """The answers written so far. A last line cut short by a crash is cut off the file, so
    the resumed run appends after the last whole answer and redoes the lost one."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows, end = [], 0
    for line in data.split(b"\n")[:-1]:  # text after the last newline was never finished
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
        end += len(line) + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    return rows


# ---- 2. chunks ------------------------------------------------------------------------------


def stdlib_files(seed: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts)
    random.Random(seed).shuffle(files)
    return files


def build_chunks(cfg: TrainConfig, tokenizer) -> dict:
    """Token chunks (train and held-out), cached in chunks.json."""
    path = cfg.work / "chunks.json"
    if path.is_file():
        return json.loads(path.read_text())
    docs: list[list[int]] = []
    answers = cfg.work / "answers.jsonl"
    for row in read_answers(answers):
        docs.append(row["prompt_ids"] + row["answer_ids"])
    total = sum(len(d) for d in docs)
    sources = []
    for f in stdlib_files(cfg.seed):
        if total >= cfg.tokens:
            break
        text = f.read_text(errors="replace")
        if not text.strip():
            continue
        ids = tokenizer(text)["input_ids"][: cfg.tokens - total]
        docs.append(ids)
        sources.append(str(f))
        total += len(ids)
    chunks = [d[i:i + cfg.chunk] for d in docs for i in range(0, len(d), cfg.chunk)]
    chunks = [c for c in chunks if len(c) >= 2 + cfg.heads]
    budget, kept = cfg.tokens, []
    for c in chunks:
        if budget <= 0:
            break
        kept.append(c[:budget])
        budget -= len(kept[-1])
    data = {"train": [c for i, c in enumerate(kept) if i % 20],
            "heldout": [c for i, c in enumerate(kept) if i % 20 == 0],
            "stdlib_files": len(sources), "answer_docs": answers.is_file() and len(docs) - len(sources)}
    atomic_json(path, data)
    return data
