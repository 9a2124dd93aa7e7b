"""Medusa draft heads: K small blocks on the target's last hidden state.

Head k maps the target's final normed hidden state h_t (the input of its lm_head, which
predicts token t+1) to a guess at token t+k+2: `h + SiLU(W_k h + b_k)`, then the target's
own frozen output projection. The projection is restricted to a "hot" vocabulary (the
tokens the target predicts most often, FR-Spec's idea), so all K heads together cost K
d x d blocks plus one [K, d] x [d, H] product instead of K passes over the full vocab.
Heads can only propose hot tokens; verification is by the target over the full vocab,
so the restriction never changes the output.

On disk a heads directory holds `heads.json` (kind, target, shapes, accuracies) and
`heads.safetensors` (bf16 blocks, int32 hot token ids). `check_heads` compares the json
against a target's config without loading any weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS_JSON = "heads.json"
HEADS_WEIGHTS = "heads.safetensors"
KINDS = ("medusa", "amphista")
BUILTIN_HEADS_DIR = Path(__file__).parent / "builtin_heads"  # <target alias>/<name>/


@dataclass
class HeadsConfig:
    kind: str
    target: str  # the model the heads were trained on (name as given to train-heads)
    hidden_size: int
    vocab_size: int  # the target's full vocabulary
    n_heads: int = 4
    hot_vocab: int = 16384  # rows of the output projection the heads use
    width: int = 512  # amphista: width of the auto-embedding block over the K head positions
    accuracy: dict = field(default_factory=dict)  # held-out top-1 / top-5 per head, filled by training

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown heads kind {self.kind!r}; supported: {', '.join(KINDS)}")
        for name in ("hidden_size", "vocab_size", "n_heads", "hot_vocab", "width"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"HeadsConfig.{name} must be positive, got {getattr(self, name)}")
        check_width(self.kind, self.width)
        if self.hot_vocab > self.vocab_size:
            raise ValueError(f"hot_vocab ({self.hot_vocab}) exceeds the vocabulary ({self.vocab_size})")

    @classmethod
    def read(cls, directory: Path) -> HeadsConfig:
        path = Path(directory) / HEADS_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a heads directory (no {HEADS_JSON})")
        return cls(**json.loads(path.read_text()))

    def write(self, directory: Path) -> None:
        (Path(directory) / HEADS_JSON).write_text(json.dumps(asdict(self), indent=2) + "\n")


def check_width(kind: str, width: int) -> None:
    if kind == "amphista" and width > 64 and width % 64:
        raise ValueError(f"amphista width {width} must be a multiple of 64 (its attention heads' size)")


class DraftHeads(nn.Module):
    """What every kind of heads shares: the hot vocabulary and the frozen output rows, the
    scoring through them, and the files. A kind defines `features` (and its parameters)."""

    uses_token = False  # whether features need the newest committed token (its embedding)

    def __init__(self, cfg: HeadsConfig, hot_ids: Tensor, hot_rows: Tensor):
        """`hot_ids` long [H]: the full-vocab ids of the hot tokens; `hot_rows` [H, d]: those
        rows of the target's output projection (`output_rows`), kept frozen."""
        super().__init__()
        self.cfg = cfg
        self.embed: Callable[[Tensor], Tensor] | None = None  # token ids -> the target's embedding rows
        self.register_buffer("hot_ids", hot_ids.to(torch.long).clone())
        self.register_buffer("hot_head", hot_rows.detach().clone())

    @property
    def n_heads(self) -> int:
        return self.cfg.n_heads

    def features(self, hidden: Tensor, embedded: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, hidden: Tensor, embedded: Tensor | None = None) -> Tensor:
        """hidden [B, d] (the target's final normed states at t), embedded [B, d] (the
        target's embedding of token t+1, for kinds that use it) -> hot-vocab logits [K, B, H]."""
        feats = self.features(hidden, embedded)
        return feats.to(self.hot_head.dtype) @ self.hot_head.T

    def _logits(self, hidden: Tensor, token: int | None) -> Tensor:
        embedded = None
        if self.uses_token:
            if token is None or self.embed is None:
                raise ValueError(f"{self.cfg.kind} heads need the newest token and the target's embedding")
            embedded = self.embed(torch.tensor([token])).to(device=hidden.device, dtype=hidden.dtype)
        return self.forward(hidden.reshape(1, -1), embedded)[:, 0].float()

    @torch.inference_mode()
    def top(self, hidden: Tensor, m: int, token: int | None = None) -> tuple[Tensor, Tensor]:
        """For one hidden state [d] (and the token it predicted, now committed): each head's
        m likeliest tokens, (full-vocab ids [K, m], probabilities [K, m]), from the softmax
        over the hot vocabulary."""
        probs, idx = torch.softmax(self._logits(hidden, token), -1).topk(m, dim=-1)
        return self.hot_ids[idx], probs

    def trained(self) -> dict[str, nn.Parameter]:
        """The parameters training moves and the files keep (the hot rows stay the target's)."""
        return dict(self.named_parameters())

    # ---- files ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().to(torch.bfloat16).contiguous() for name, p in self.trained().items()}
        save_file({**tensors, "hot_ids": self.hot_ids.to(torch.int32).contiguous()}, str(directory / HEADS_WEIGHTS))
        self.cfg.write(directory)


class MedusaHeads(DraftHeads):
    def __init__(self, cfg: HeadsConfig, hot_ids: Tensor, hot_rows: Tensor):
        super().__init__(cfg, hot_ids, hot_rows)
        d, k = cfg.hidden_size, cfg.n_heads
        self.weight = nn.Parameter(torch.zeros(k, d, d))  # zero: every head starts as the lm_head
        self.bias = nn.Parameter(torch.zeros(k, d))

    def features(self, hidden: Tensor, embedded: Tensor | None = None) -> Tensor:
        """hidden [B, d] -> [K, B, d]: each head's residual block."""
        x = hidden.to(self.weight.dtype)
        return head_blocks(x.expand(self.n_heads, -1, -1), self.weight, self.bias)


def head_blocks(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """One residual SiLU block per head: x [K, B, d], weight [K, d, d], bias [K, d] -> [K, B, d]."""
    return x + F.silu(torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)))


def resolve_heads(name: str, target: str) -> Path:
    """A heads directory, or the name of built-in heads for `target` (e.g. `medusa`)."""
    builtin = BUILTIN_HEADS_DIR / target / name
    if "/" not in name and (builtin / HEADS_JSON).is_file():
        return builtin
    path = Path(name).expanduser()
    if (path / HEADS_JSON).is_file():
        return path
    available = sorted(p.name for p in (BUILTIN_HEADS_DIR / target).glob("*") if (p / HEADS_JSON).is_file())
    hint = f"built-in heads for {target}: {', '.join(available)}" if available else f"no built-in heads for {target}"
    raise FileNotFoundError(f"heads {name!r} are neither built-in nor a directory with {HEADS_JSON} ({hint})")


def check_heads(directory: Path, target: str, hidden_size: int, vocab_size: int) -> HeadsConfig:
    """Refuse heads trained for another model, naming both, before any weights load."""
    cfg = HeadsConfig.read(directory)
    if (cfg.hidden_size, cfg.vocab_size) != (hidden_size, vocab_size):
        raise ValueError(
            f"heads in {directory} were trained for {cfg.target!r} (hidden size {cfg.hidden_size}, vocabulary "
            f"{cfg.vocab_size}); target {target!r} has hidden size {hidden_size}, vocabulary {vocab_size}")
    return cfg


def output_rows(model, ids: Tensor) -> Tensor:
    """Rows `ids` of a Transformer's output projection as float32 [len(ids), d], whether it
    is dense or GGUF blocks (dequantized row by row, never the whole matrix)."""
    from actors.quantized import QuantLinear

    if isinstance(model.output, QuantLinear):
        return model.output.qweight.rows(ids).float()
    return model.output.weight.detach()[ids].float()


def output_rows_from_files(model_dir: Path, ids: Tensor) -> Tensor:
    """Rows `ids` (sorted) of a model's output projection, read from its safetensors files
    without loading the model: what a heads actor needs, on a device without the target.
    Tied models keep the projection in the token embedding."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    names = ("lm_head.weight", "model.embed_tokens.weight", "model.language_model.embed_tokens.weight")
    for name in names:
        for file in files:
            with safe_open(str(file), "pt") as f:
                if name not in f.keys():
                    continue
                rows, table = [], f.get_slice(name)
                ids_list = ids.tolist()
                start = 0
                while start < len(ids_list):  # contiguous runs of ids: one read each
                    end = start + 1
                    while end < len(ids_list) and ids_list[end] == ids_list[end - 1] + 1:
                        end += 1
                    rows.append(table[ids_list[start]:ids_list[end - 1] + 1].float())
                    start = end
                return torch.cat(rows)
    raise FileNotFoundError(f"{model_dir} has no safetensors file holding {' or '.join(names)}: a heads actor "
                            "reads the target's output rows from there")


def embedding_rows(model, ids: Tensor) -> Tensor:
    """The target's token embedding rows for `ids` as float32 (dense or GGUF blocks), before
    any model-specific scaling: what Amphista heads read the newest token through."""
    if model.quant_embedding is not None:
        return model.quant_embedding(ids).float()
    return F.embedding(ids, model.tok_embeddings).float()


class EmbeddingFromFiles:
    """Embedding rows read on demand from the target's safetensors files (memory-mapped), so
    a heads actor holds no copy of the table."""

    NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        for file in sorted(Path(model_dir).glob("*.safetensors")):
            handle = safe_open(str(file), "pt")
            for name in self.NAMES:
                if name in handle.keys():
                    self.handle, self.table = handle, handle.get_slice(name)
                    return
        raise FileNotFoundError(f"{model_dir} has no safetensors file holding {' or '.join(self.NAMES)}")

    def __call__(self, ids: Tensor) -> Tensor:
        return torch.cat([self.table[i:i + 1].float() for i in ids.tolist()])
