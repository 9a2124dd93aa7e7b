"""`specray linearize`: attention transfer into linearized attention (actors/linear_attention.py).

The base model stays frozen. Every layer's new parameters (feature maps, gain, convolution)
learn, independently of the other layers, to reproduce that layer's softmax attention
output from its true inputs (teacher forcing). Stages, each cached under the work
directory and resumed where it stopped (Ctrl-C is safe at any point):

  1. chunks   Python standard-library sources and the Python reference docs
              (`pydoc_data.topics`), tokenized and cut into --seq-token chunks, up to
              --tokens; every 10th file / topic is held out (never trained on) and listed,
              so quality benchmarks can measure on held-out text only
  2. capture  one forward per chunk: every layer's post-RoPE q, k, v (bf16 shards)
  3. train    AdamW on MSE(linearized attention, softmax attention) per layer, fp32,
              checkpointed with the optimizer state
  4. write    DIR/linear.json (config + metadata) and DIR/linear.safetensors (bf16)
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from actors import linear_attention as lin
from actors.paths import durable_replace, safetensors_whole
from training.checkpoint import load_state, save_state
from training.medusa import _add_time, _atomic_json, _stdlib_files

HELDOUT_EVERY = 10  # every 10th stdlib file / docs topic is held out
PROSE_SHARE = 0.25  # of the training chunks: English prose (the reference docs), the rest code
CHECKPOINT_S = 60.0  # seconds between saved training states


@dataclass
class LinearizeConfig:
    model: str
    out: Path
    work: Path
    tokens: int = 32768
    seq: int = 1024
    epochs: int = 3
    lr: float = 3e-3
    group: int = 64
    features: int = 64
    conv: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "seq", "epochs", "group", "features", "conv"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"linearize --{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"linearize --lr must be a positive number, got {self.lr}")
        if self.seq < 2:
            raise ValueError(f"linearize --seq must be at least 2, got {self.seq}")
        if self.tokens < self.seq:
            raise ValueError(f"linearize --tokens {self.tokens} is less than one --seq {self.seq} chunk")
        self.out, self.work = Path(self.out), Path(self.work)

    def linear_config(self) -> lin.LinearConfig:
        return lin.LinearConfig(group=self.group, features=self.features, conv=self.conv)


# ---- text sources ---------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_documents(seed: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out) stdlib files, in a seeded order; every 10th held out."""
    files = _stdlib_files(seed)
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
    _atomic_json(path, data)
    return data


# ---- 2. capture -----------------------------------------------------------------------------


def capture(model, chunks: dict, work: Path) -> dict[str, list[Path]]:
    """One forward per chunk; every layer's post-RoPE q [H, N, D] and k, v [Hkv, N, D], bf16,
    one safetensors file per chunk."""
    from safetensors.torch import save_file

    from actors.layers import rotate_half

    plan = [(split, j) for split in ("train", "heldout") for j in range(len(chunks[split]))]
    out: dict[str, list[Path]] = {"train": [], "heldout": []}
    todo = [(s, j) for s, j in plan if not safetensors_whole(work / f"cap-{s}-{j:04d}.safetensors")]
    for s, j in plan:
        out[s].append(work / f"cap-{s}-{j:04d}.safetensors")
    if not todo:
        return out
    cfg = model.config
    H, D = cfg.n_heads, cfg.head_dim
    qs: dict[int, torch.Tensor] = {}

    def hook(i):
        def grab(module, args, output):
            qs[i] = output.detach().clone()
        return grab

    handles = [blk.attn.wq.register_forward_hook(hook(i)) for i, blk in enumerate(model.layers)]
    bar = tqdm(total=sum(len(chunks[s][j]) for s, j in plan), desc="capture (q, k, v per layer)", unit="tok",
               unit_scale=True, initial=sum(len(chunks[s][j]) for s, j in plan if (s, j) not in todo))
    try:
        for s, j in todo:
            ids = torch.tensor(chunks[s][j])
            N = len(ids)
            cache = model.new_cache(N)
            qs.clear()
            with torch.inference_mode():
                model.forward_hidden(ids, cache, prefill=True)
                freqs = torch.arange(N, device=model.device).float()[:, None] * model.inv_freq[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                cos, sin = emb.cos().to(model.dtype), emb.sin().to(model.dtype)
                tensors = {}
                for i, blk in enumerate(model.layers):
                    q = qs[i].view(N, H, D).transpose(0, 1)
                    if blk.attn.q_norm is not None:
                        q = blk.attn.q_norm(q)
                    q = q * cos + rotate_half(q) * sin  # exactly as Attention.forward
                    tensors[f"q.{i}"] = q.to(torch.bfloat16).contiguous()
                    tensors[f"k.{i}"] = cache.k[i, 0, :, :N].to(torch.bfloat16).contiguous()
                    tensors[f"v.{i}"] = cache.v[i, 0, :, :N].to(torch.bfloat16).contiguous()
            path = work / f"cap-{s}-{j:04d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            durable_replace(tmp, path)
            bar.update(N)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return out


# ---- 3. train -------------------------------------------------------------------------------


def new_params(lcfg: lin.LinearConfig, n_layers: int, n_heads: int, n_kv: int, head_dim: int) -> list[lin.LinearParams]:
    return [lin.LinearParams(lcfg, n_heads, n_kv, head_dim) for _ in range(n_layers)]


def named(params: list[lin.LinearParams]) -> dict[str, torch.Tensor]:
    """The names `Transformer.linear_params()` uses: layers.I.NAME."""
    return {f"layers.{i}.{n}": t for i, p in enumerate(params) for n, t in p.named_parameters()}


def layer_loss(p: lin.LinearParams, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE, target): linearized vs softmax attention of one layer over one whole sequence."""
    q, k, v = q.float(), k.float(), v.float()
    N = q.shape[1]
    if target is None:
        with torch.no_grad():
            target = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                    enable_gqa=q.shape[0] != k.shape[0])[0]
    step = lin.plan_step(p.cfg, 0, torch.arange(N), None)
    y = lin.attend(p, q, k, v, step, lin.empty_sums(p, q.device), scale)
    return F.mse_loss(y, target), target


def _shard(path: Path, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(f"q.{i}"), f.get_tensor(f"k.{i}"), f.get_tensor(f"v.{i}")


@torch.no_grad()
def evaluate(params: list[lin.LinearParams], shards: list[Path], scale: float) -> dict:
    """Per layer, over the held-out shards: MSE and relative error ||lin - softmax|| / ||softmax||."""
    mse, err, ref = [0.0] * len(params), [0.0] * len(params), [0.0] * len(params)
    for path in shards:
        for i, p in enumerate(params):
            loss, target = layer_loss(p, *_shard(path, i), scale)
            mse[i] += loss.item() / len(shards)
            err[i] += loss.item() * target.numel()
            ref[i] += target.pow(2).sum().item()
    return {"mse": [round(m, 8) for m in mse],
            "rel_error": [round(math.sqrt(e / max(r, 1e-30)), 5) for e, r in zip(err, ref)]}


def train(cfg: LinearizeConfig, params: list[lin.LinearParams], shards: list[Path], scale: float) -> list[float]:
    """Every layer on every training chunk, --epochs passes, cosine-decayed AdamW; one step is
    one chunk for all layers (each layer's backward alone: memory of one layer). Returns the
    per-layer mean loss of the last pass."""
    all_params = [t for p in params for t in p.parameters()]
    opt = torch.optim.AdamW(all_params, lr=cfg.lr, weight_decay=0.0)
    tag = f"g{cfg.group}-f{cfg.features}-c{cfg.conv}-lr{cfg.lr:g}"
    state = cfg.work / f"train-state-{tag}.safetensors"
    total = len(shards) * cfg.epochs
    step, losses = 0, []
    if safetensors_whole(state):
        step, meta = load_state(state, named(params), opt)
        losses = json.loads(meta["losses"])
    bar = tqdm(total=total, initial=step, desc="train (all layers, one chunk a step)", unit="step")
    saved = time.monotonic()
    while step < total:
        epoch, j = divmod(step, len(shards))
        order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        path = shards[int(order[j])]
        for g in opt.param_groups:  # cosine decay, recomputed from the step so resuming is exact
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        opt.zero_grad()
        row = []
        for i, p in enumerate(params):
            loss, _ = layer_loss(p, *_shard(path, i), scale)
            loss.backward()
            row.append(loss.item())
        opt.step()
        step += 1
        losses.append(row)
        bar.set_postfix(loss=f"{sum(row) / len(row):.3g}")
        bar.update(1)
        if time.monotonic() - saved > CHECKPOINT_S or step == total:
            save_state(state, named(params), opt, step, {"losses": json.dumps(losses)})
            saved = time.monotonic()
    bar.close()
    last = losses[-len(shards):] if losses else []
    return [sum(r[i] for r in last) / len(last) for i in range(len(params))] if last else []


# ---- the command ----------------------------------------------------------------------------


def _base_name(model: str) -> str:
    from actors.loading import BUILTINS

    if model in BUILTINS:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def run(cfg: LinearizeConfig) -> dict:
    from safetensors.torch import save_file

    from actors import hardware, loading
    from actors.model_config import ModelConfig

    if loading.linear_dir(cfg.model) is not None:
        raise ValueError(f"linearize --model {cfg.model!r} is linearized already; give its base model")
    loading.resolve(cfg.model)  # a bad name fails here, before anything loads
    cfg.work.mkdir(parents=True, exist_ok=True)
    data_key = {"model": _base_name(cfg.model), "tokens": cfg.tokens, "seq": cfg.seq, "seed": cfg.seed}
    key_path = cfg.work / "data.json"
    if key_path.is_file() and json.loads(key_path.read_text()) != data_key:
        raise ValueError(f"work directory {cfg.work} holds data of another run ({key_path.read_text()}); "
                         "give another --work or remove it")
    _atomic_json(key_path, data_key)
    mc = ModelConfig.from_hf(loading.read_config(cfg.model))
    if "sliding_attention" in mc.layer_types:
        raise ValueError(f"linearizing {mc.family} models with sliding-window layers is not supported")
    lcfg = cfg.linear_config()
    lcfg.linear_layers(mc.n_layers)
    torch.manual_seed(cfg.seed)
    clock = time.perf_counter()

    def lap(stage: str) -> dict:
        nonlocal clock
        times = _add_time(cfg.work, stage, time.perf_counter() - clock)
        clock = time.perf_counter()
        return times

    tokenizer = loading.load_tokenizer(cfg.model)
    chunks = build_chunks(cfg, tokenizer)
    lap("chunks")
    if not chunks["train"] or not chunks["heldout"]:
        raise ValueError(f"not enough text for one --seq {cfg.seq} chunk of each split")
    done = all(safetensors_whole(cfg.work / f"cap-{s}-{j:04d}.safetensors")
               for s in ("train", "heldout") for j in range(len(chunks[s])))
    shards = {s: [cfg.work / f"cap-{s}-{j:04d}.safetensors" for j in range(len(chunks[s]))]
              for s in ("train", "heldout")}
    if not done:
        dtype = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
        loaded = loading.load(cfg.model, dtype)
        if loaded.hf_model is None:
            raise ValueError(f"linearize needs a dense model; {cfg.model!r} loaded as {loaded.precision}")
        model = loaded.build()
        model.tune_kernels(progress=True)
        lap("load")
        shards = capture(model, chunks, cfg.work)
        del model, loaded
        lap("capture")
    params = new_params(lcfg, mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.head_dim)
    scale = mc.attn_scale
    init_path = cfg.work / f"eval-initial-g{cfg.group}-f{cfg.features}-c{cfg.conv}.json"
    if init_path.is_file():
        initial = json.loads(init_path.read_text())
    else:
        initial = evaluate(params, shards["heldout"], scale)
        _atomic_json(init_path, initial)
    train_loss = train(cfg, params, shards["train"], scale)
    lap("train")
    final = evaluate(params, shards["heldout"], scale)
    times = lap("evaluate")
    meta = {"base": _base_name(cfg.model), **lcfg.to_dict(),
            "tokens": len(chunks["train"]) * cfg.seq, "seq": cfg.seq, "epochs": cfg.epochs, "lr": cfg.lr,
            "seed": cfg.seed, "train_chunks": len(chunks["train"]), "heldout_chunks": len(chunks["heldout"]),
            "train_loss": [round(x, 8) for x in train_loss],
            "heldout_initial": initial, "heldout_final": final,
            "minutes": {k: round(v / 60, 2) for k, v in times.items()},
            "heldout_docs": chunks["heldout_docs"]}
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out / (lin.LINEAR_FILE + ".tmp")
    save_file({k: t.detach().to(torch.bfloat16).contiguous() for k, t in named(params).items()}, str(tmp),
              metadata={"base": meta["base"]})
    durable_replace(tmp, cfg.out / lin.LINEAR_FILE)
    _atomic_json(cfg.out / lin.LINEAR_CONFIG, meta)
    for i in range(mc.n_layers):
        print(f"layer {i:2d}: held-out mse {initial['mse'][i]:.3g} -> {final['mse'][i]:.3g}, "
              f"relative error {initial['rel_error'][i]:.3f} -> {final['rel_error'][i]:.3f}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"mean relative error {mean(initial['rel_error']):.3f} -> {mean(final['rel_error']):.3f} over "
          f"{len(chunks['heldout'])} held-out chunks; {meta['tokens']} training tokens, {cfg.epochs} epochs; "
          f"minutes {meta['minutes']}; wrote {cfg.out}")
    return meta
