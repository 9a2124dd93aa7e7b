"""`specray train-heads`: Medusa or Amphista heads by self-distillation, on this machine's CPU.

The target stays frozen and supplies both the inputs (its last hidden states) and the
labels (its own top-8 next-token distribution at each position), so the heads learn what
the target would say, not what the text says. Stages, each cached under the work
directory and resumed where it stopped (Ctrl-C is safe at any point):

  1. answers   the target's own greedy answers to Spec-Bench prompts (batched generate),
               minus the categories the benchmarks decode (coding, math, math_reasoning)
  2. chunks    those answers plus Python standard-library sources, tokenized and cut into
               chunks, up to --tokens; every 20th chunk is held out for evaluation
  3. features  one target prefill per chunk: hidden states (bf16) and the top-8 labels,
               written in shards
  4. hot vocab the tokens the target predicts most often on the training shards
  5. train     AdamW over all heads at once, checkpointed (safetensors) every 50 steps;
               stages 1-4 do not depend on the kind, so Medusa and Amphista heads trained
               in one work directory see the very same data and labels
  6. evaluate  per-head top-1 / top-5 accuracy against the target's argmax, held out

Head k at position t learns the target's distribution at position t+k+1, i.e. its guess
at token t+k+2, seeing h_t (and, for Amphista, the embedding of token t+1).
"""

from __future__ import annotations

import json
import math
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from actors.head_kinds import make_heads
from actors.heads import KINDS, DraftHeads, HeadsConfig, check_width, embedding_rows, output_rows
from actors.paths import durable_replace, safetensors_whole
from training.checkpoint import load_state, save_state

CHECKPOINT_EVERY = 50  # steps between saved training states
TOP = 8  # labels kept per position: the target's 8 likeliest next tokens
EXCLUDED_CATEGORIES = ("coding", "math", "math_reasoning")  # what the benchmarks decode: never trained on
DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


@dataclass
class TrainConfig:
    target: str
    out: Path
    work: Path
    kind: str = "medusa"
    heads: int = 4
    tokens: int = 300_000  # prefilled tokens, answers first, then standard-library code
    seed: int = 0
    hot_vocab: int = 16384
    chunk: int = 512
    answer_tokens: int = 256  # longest generated answer
    answer_batch: int = 16
    questions: Path = DEFAULT_QUESTIONS
    epochs: int = 2
    batch: int = 512  # positions per step
    lr: float = 1e-3
    width: int = 512  # amphista: the auto-embedding block's width

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"train-heads --kind {self.kind!r}: one of {', '.join(KINDS)}")
        for name in ("heads", "tokens", "hot_vocab", "chunk", "answer_tokens", "answer_batch", "epochs", "batch",
                     "width"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"train-heads --{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check_width(self.kind, self.width)  # before the target loads
        if self.chunk < 2 + self.heads:
            raise ValueError(f"--chunk {self.chunk} is too short for {self.heads} heads")
        self.out, self.work, self.questions = Path(self.out), Path(self.work), Path(self.questions)


def _add_time(work: Path, stage: str, seconds: float) -> dict:
    """Seconds spent per stage, summed over the runs that worked on it (timings.json)."""
    path = work / "timings.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[stage] = round(times.get(stage, 0.0) + seconds, 1)
    _atomic_json(path, times)
    return times


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    durable_replace(tmp, path)


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


def _stdlib_files(seed: int) -> list[Path]:
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
    for f in _stdlib_files(cfg.seed):
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
    _atomic_json(path, data)
    return data


# ---- 3. features ----------------------------------------------------------------------------


def _shards(chunks: list[list[int]], per_shard: int = 8192) -> list[list[int]]:
    """Chunk indices grouped into shards of about `per_shard` tokens."""
    shards, cur, n = [], [], 0
    for i, c in enumerate(chunks):
        cur.append(i)
        n += len(c)
        if n >= per_shard:
            shards.append(cur)
            cur, n = [], 0
    if cur:
        shards.append(cur)
    return shards


def extract_features(model, chunks: dict, work: Path) -> dict[str, list[Path]]:
    """Prefill every chunk once; write hidden states and top-8 labels shard by shard."""
    from safetensors.torch import save_file

    out: dict[str, list[Path]] = {}
    plan = [(split, i, idx) for split in ("train", "heldout") for i, idx in enumerate(_shards(chunks[split]))]
    total = sum(len(chunks[s][j]) for s, _, idx in plan for j in idx)
    bar = tqdm(total=total, desc="features (target prefill)", unit="tok", unit_scale=True)
    cache = model.new_cache(max(len(c) for s in ("train", "heldout") for c in chunks[s]))
    for split, i, idx in plan:
        path = work / f"feat-{split}-{i:04d}.safetensors"
        out.setdefault(split, []).append(path)
        n_tok = sum(len(chunks[split][j]) for j in idx)
        if safetensors_whole(path):
            bar.update(n_tok)
            continue
        hidden, top_ids, top_p, lengths = [], [], [], []
        for j in idx:
            ids = torch.tensor(chunks[split][j])
            cache.crop(0)
            h = model.forward_hidden(ids, cache)
            p, t = torch.softmax(model.logits(h), -1).topk(TOP, dim=-1)
            hidden.append(h.to(torch.bfloat16))
            top_ids.append(t.to(torch.int32))
            top_p.append(p.to(torch.float16))
            lengths.append(len(ids))
            bar.update(len(ids))
        tmp = path.with_suffix(".tmp")
        save_file({"hidden": torch.cat(hidden), "top_ids": torch.cat(top_ids), "top_p": torch.cat(top_p),
                   "lengths": torch.tensor(lengths, dtype=torch.int64)}, str(tmp))
        durable_replace(tmp, path)
    bar.close()
    return out


def _load_shards(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    parts = [load_file(str(p)) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _attach_tokens(data: dict, chunks: list[list[int]], model) -> None:
    """Token ids aligned with the feature rows (the shards keep the chunks' order) and the
    target's embedding rows of every distinct one: what Amphista's heads read as token t+1."""
    ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
    if ids.numel() != data["hidden"].shape[0]:
        raise ValueError(f"features hold {data['hidden'].shape[0]} positions but the chunks {ids.numel()} tokens: "
                         "the work directory mixes runs; remove its feat-*.safetensors")
    distinct = ids.unique()
    data["ids"] = ids
    data["embed_index"] = torch.full((int(distinct.max()) + 1,), -1, dtype=torch.long)
    data["embed_index"][distinct] = torch.arange(distinct.numel())
    with torch.no_grad():
        data["embed_rows"] = torch.cat([embedding_rows(model, distinct[i:i + 4096])
                                        for i in range(0, distinct.numel(), 4096)])


# ---- 4. hot vocabulary ----------------------------------------------------------------------


def hot_vocabulary(top_ids: torch.Tensor, vocab_size: int, size: int) -> torch.Tensor:
    """The `size` tokens the target ranks first most often (then anywhere in its top 8),
    ties to the lower id: sorted full-vocab ids, long [size]."""
    score = torch.bincount(top_ids[:, 0].long(), minlength=vocab_size).double() * TOP
    score += torch.bincount(top_ids.flatten().long(), minlength=vocab_size).double()
    ids = torch.arange(vocab_size, dtype=torch.double)  # ties: the lower id ranks higher
    return torch.argsort(score * (vocab_size + 1) - ids, descending=True)[:size].sort().values


# ---- 5. training ----------------------------------------------------------------------------


def _positions(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position t with at least head 0's label (t + 1 < chunk end), and its chunk end."""
    starts = torch.cumsum(lengths, 0) - lengths
    pos, ends = [], []
    for s, n in zip(starts.tolist(), lengths.tolist()):
        pos.append(torch.arange(s, s + n - 1))
        ends.append(torch.full((n - 1,), s + n))
    return torch.cat(pos), torch.cat(ends)


def _labels(data: dict, hot_index: torch.Tensor, at: torch.Tensor, valid: torch.Tensor):
    """Soft labels at rows `at` in hot-vocab coordinates: (index [..., 8], weight [..., 8])."""
    at = at.clamp(max=data["top_ids"].shape[0] - 1)
    idx = hot_index[data["top_ids"][at].long()]
    w = data["top_p"][at].float() * (idx >= 0) * valid.unsqueeze(-1)
    return idx.clamp(min=0), w


def _embedded(heads: DraftHeads, data: dict, batch: torch.Tensor) -> torch.Tensor | None:
    """The target's embedding of token t+1 for positions `batch`, for kinds that read it."""
    if not heads.uses_token:
        return None
    return data["embed_rows"][data["embed_index"][data["ids"][batch + 1]]]


def _loss(heads: DraftHeads, data: dict, hot_index: torch.Tensor, batch: torch.Tensor, ends: torch.Tensor,
          bf16: bool):
    h = data["hidden"][batch].float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the [K*B, d] x [d, H] product
        logits = heads(h, _embedded(heads, data, batch)).float()  # [K, B, H]
    logp = F.log_softmax(logits, -1)
    total = 0.0
    for k in range(heads.n_heads):
        at = batch + k + 1
        idx, w = _labels(data, hot_index, at, at < ends)
        total = total - (logp[k].gather(-1, idx) * w).sum() / w.sum().clamp(min=1.0)
    return total / heads.n_heads


def train(cfg: TrainConfig, heads: DraftHeads, data: dict) -> None:
    from actors import hardware

    bf16 = hardware.probe("cpu").native_bf16  # the big product in bf16 only where the CPU multiplies it natively
    vocab = heads.cfg.vocab_size
    hot_index = torch.full((vocab,), -1, dtype=torch.long)
    hot_index[heads.hot_ids] = torch.arange(heads.hot_ids.numel())
    pos, ends = _positions(data["lengths"])
    steps_per_epoch = math.ceil(pos.numel() / cfg.batch)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(list(heads.trained().values()), lr=cfg.lr, weight_decay=0.0)
    state = cfg.work / f"train-state-{heads.cfg.kind}.safetensors"
    step = load_state(state, heads.trained(), opt)[0] if safetensors_whole(state) else 0
    bar = tqdm(total=total, initial=step, desc=f"train {heads.cfg.kind} heads", unit="step")
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        sel = order[i * cfg.batch:(i + 1) * cfg.batch]
        for g in opt.param_groups:  # cosine decay, recomputed from the step so resuming is exact
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = _loss(heads, data, hot_index, pos[sel], ends[sel], bf16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        if step % CHECKPOINT_EVERY == 0 or step == total:
            save_state(state, heads.trained(), opt, step)
    bar.close()


# ---- 6. evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(heads: DraftHeads, data: dict, ranks: int = 10) -> dict:
    """Per head: how often the target's argmax at its offset is the head's top-1, is in
    its top-5, and sits at each of its first `ranks` ranks (what static trees are built from)."""
    pos, ends = _positions(data["lengths"])
    at_rank = torch.zeros(heads.n_heads, ranks)
    seen = torch.zeros(heads.n_heads)
    for i in range(0, pos.numel(), 1024):
        batch, end = pos[i:i + 1024], ends[i:i + 1024]
        logits = heads(data["hidden"][batch].float(), _embedded(heads, data, batch))
        top = heads.hot_ids[logits.topk(ranks, dim=-1).indices]  # [K, B, ranks]
        for k in range(heads.n_heads):
            at = batch + k + 1
            ok = at < end
            want = data["top_ids"][at.clamp(max=data["top_ids"].shape[0] - 1), 0].long()
            at_rank[k] += ((top[k] == want[:, None]) & ok[:, None]).sum(0).float()
            seen[k] += ok.sum()
    rank_acc = at_rank / seen.clamp(min=1)[:, None]
    return {"top1": [round(float(r[0]), 4) for r in rank_acc],
            "top5": [round(float(r[:5].sum()), 4) for r in rank_acc],
            "rank_accuracy": [[round(float(v), 5) for v in r] for r in rank_acc],
            "positions": [int(s) for s in seen]}


# ---- the command ----------------------------------------------------------------------------


def run(cfg: TrainConfig) -> dict:
    from actors import hardware, loading

    cfg.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = time.perf_counter()
    dtype = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
    target = loading.load(cfg.target, dtype)
    if target.hf_model is None:
        raise ValueError(f"train-heads needs a dense target; {cfg.target!r} loaded as {target.precision}")
    model = target.build()
    model.tune_kernels(progress=True)

    def lap(stage: str) -> None:
        nonlocal clock
        _add_time(cfg.work, stage, time.perf_counter() - clock)
        clock = time.perf_counter()

    lap("load")
    generate_answers(cfg, target.hf_model, target.tokenizer)
    lap("answers")
    chunks = build_chunks(cfg, target.tokenizer)
    shards = extract_features(model, chunks, cfg.work)
    lap("features")
    train_data, heldout = _load_shards(shards["train"]), _load_shards(shards["heldout"])
    heads_cfg = HeadsConfig(cfg.kind, cfg.target, model.config.hidden_size, model.config.vocab_size,
                            n_heads=cfg.heads, hot_vocab=min(cfg.hot_vocab, model.config.vocab_size), width=cfg.width)
    hot = hot_vocabulary(train_data["top_ids"], heads_cfg.vocab_size, heads_cfg.hot_vocab)
    heads = make_heads(heads_cfg, hot, output_rows(model, hot))
    if heads.uses_token:
        _attach_tokens(train_data, chunks["train"], model)
        _attach_tokens(heldout, chunks["heldout"], model)
    del target, model  # the heads keep their own copy of the hot rows; the 1.5B can go
    train(cfg, heads, train_data)
    lap(f"train-{cfg.kind}")
    acc = evaluate(heads, heldout)
    times = _add_time(cfg.work, f"evaluate-{cfg.kind}", time.perf_counter() - clock)
    times = {k: v for k, v in times.items() if "-" not in k or k.endswith(f"-{cfg.kind}")}  # not the other kinds'
    coverage = float(torch.isin(heldout["top_ids"][:, 0].long(), heads.hot_ids).float().mean())
    heads.cfg.accuracy = {**acc, "hot_coverage": round(coverage, 4),
                          "train_tokens": int(train_data["lengths"].sum()),
                          "heldout_tokens": int(heldout["lengths"].sum()),
                          "minutes": round(sum(times.values()) / 60, 1), "stage_seconds": times,
                          "config": {
                              k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                              if k not in ("out", "work")}}
    heads.save(cfg.out)
    for k in range(cfg.heads):
        print(f"head {k}: top-1 {acc['top1'][k]:.3f}  top-5 {acc['top5'][k]:.3f}  "
              f"({acc['positions'][k]} held-out positions)")
    print(f"hot vocabulary {heads_cfg.hot_vocab} covers {coverage:.3f} of the target's held-out argmaxes; "
          f"wrote {cfg.out}")
    return heads.cfg.accuracy
