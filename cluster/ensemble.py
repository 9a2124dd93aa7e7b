"""Ensembles, driver side: n models decoding as one (weighted or contrastive), standard
collaborative decoding (`method="ensemble"`) or CoS (`method="cos"`). This file owns what
every ensemble is asked for and checked against before any weights load (`EnsembleConfig`,
`check_members`: one vocabulary, the default proposer), and `LocalEnsemble`: the loops of
`actors.ensemble` with every model in this process (`--pipeline local`). Members in Ray
actors: `cluster.ray_ensemble`.

    with LocalEnsemble(EnsembleConfig(("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"), "we:0.5")) as ens:
        result = ens.generate(ens.tokenizer("def fib(n):")["input_ids"], DecodeConfig(max_new_tokens=128))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from actors import loading, threads
from actors.ensemble import CosOptions, CosState, cos_generate, ensemble_generate
from actors.ensemble_member import local_members
from actors.hardware import check_dtype_name, probe
from actors.runner import ModelRunner
from cluster.engine import check_prompt
from cluster.placement import PlacementConfig
from decoding.ensemble import CombineRule, parse_combine
from decoding.request import DecodeConfig, GenerationResult, TokenSink

log = logging.getLogger(__name__)

METHODS = ("cos", "ensemble")


@dataclass(frozen=True)
class EnsembleConfig:
    models: tuple[str, ...]
    combine: str
    dtype: str = "float32"
    max_len: int = 4096
    placement: PlacementConfig | None = None  # default: one bundle per member
    proposer: int | None = None  # CoS default proposer; None: the smallest model
    swap_draft_length: int = 1  # CoS: proposals a swapped-in proposer makes (its bonus included)
    role_swap: bool = True
    max_restarts: int = 3
    load_timeout_s: float = 900.0
    request_timeout_s: float = 1800.0
    member_ready_s: float = 300.0  # how long a request waits for a (re)starting member

    def __post_init__(self) -> None:
        models = tuple(self.models.split(",")) if isinstance(self.models, str) else tuple(self.models)
        models = tuple(m.strip() for m in models)
        if len(models) < 2 or not all(models):
            raise ValueError(f"an ensemble needs at least 2 model names, got {list(models)}")
        object.__setattr__(self, "models", models)
        self.rule  # parses, or raises ValueError naming what is wrong
        check_dtype_name(self.dtype)
        placement = self.placement or PlacementConfig(n_actors=len(models))
        if placement.n_actors != len(models):
            raise ValueError(f"an ensemble of {len(models)} models places {len(models)} actors, "
                             f"not {placement.n_actors}")
        object.__setattr__(self, "placement", placement)
        if self.proposer is not None and not 0 <= self.proposer < len(models):
            raise ValueError(f"proposer must index one of the {len(models)} models, got {self.proposer}")
        CosOptions(swap_draft_length=self.swap_draft_length)
        for name in ("load_timeout_s", "request_timeout_s", "member_ready_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")

    @property
    def rule(self) -> CombineRule:
        return parse_combine(self.combine, len(self.models))


def _param_estimate(config) -> int:
    c = config.get_text_config()
    h, layers = c.hidden_size, c.num_hidden_layers
    inter = getattr(c, "intermediate_size", 4 * h)
    return layers * (4 * h * h + 3 * h * inter) + c.vocab_size * h


@dataclass
class Members:
    """What the driver learns about the members before loading any weights."""

    tokenizer: object
    context_length: int
    default_proposer: int
    sizes: list[int] = field(default_factory=list)


def check_members(cfg: EnsembleConfig) -> Members:
    """Refuse unknown models and members that do not share a vocabulary, before loading."""
    for name in cfg.models:
        loading.resolve(name)
    configs = [loading.read_config(name) for name in cfg.models]
    tokenizers = [loading.load_tokenizer(name) for name in cfg.models]
    first = cfg.models[0]
    for name, tok, config in zip(cfg.models[1:], tokenizers[1:], configs[1:]):
        try:
            loading.check_same_vocab(tokenizers[0], tok, configs[0].get_text_config().vocab_size,
                                     config.get_text_config().vocab_size, (first, name))
        except ValueError as exc:
            raise ValueError(f"ensemble members must share a vocabulary (their distributions are combined "
                             f"token by token): {exc}") from None
    sizes = [_param_estimate(c) for c in configs]
    proposer = cfg.proposer if cfg.proposer is not None else min(range(len(sizes)), key=lambda i: (sizes[i], i))
    context = min(loading.context_length(c) for c in configs)
    return Members(tokenizers[0], context, proposer, sizes)


def cos_options(cfg: EnsembleConfig, proposer: int, draft_length: int | None) -> CosOptions:
    return CosOptions(default_proposer=proposer, swap_draft_length=cfg.swap_draft_length, role_swap=cfg.role_swap)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"ensemble method must be one of {METHODS}, got {method!r}")


class LocalEnsemble:
    """Every member in this process: the loops of `actors.ensemble` on ModelRunners."""

    def __init__(self, cfg: EnsembleConfig, progress: bool = True):
        self.cfg = cfg
        self.info = check_members(cfg)
        self.tokenizer = self.info.tokenizer
        loaded = [loading.load(name, cfg.dtype, progress=progress) for name in cfg.models]
        max_len = min(cfg.max_len, self.info.context_length + 64)
        self.runners = [ModelRunner.for_serving(m.build(), max_len, progress) for m in loaded]
        self.members = local_members(self.runners, list(cfg.models))
        self.eos_token_ids = loading.eos_token_ids(loaded[0])
        self.state = CosState()  # learned costs carry over between requests

    def runtime_info(self) -> dict:
        return {"cpu": probe("cpu").to_dict(), "threading": threads.describe(),
                "members": {name: r.runtime_info() for name, r in zip(self.cfg.models, self.runners)}}

    def generate(self, prompt: list[int], cfg: DecodeConfig, method: str = "cos",
                 on_tokens: TokenSink | None = None) -> GenerationResult:
        check_method(method)
        check_prompt(len(prompt), cfg.max_new_tokens, self.info.context_length)
        if not cfg.eos_token_ids:
            cfg = dataclasses.replace(cfg, eos_token_ids=self.eos_token_ids)
        if method == "ensemble":
            return ensemble_generate(self.members, self.cfg.rule, prompt, cfg, on_tokens)
        opts = cos_options(self.cfg, self.info.default_proposer, cfg.draft_length)
        return cos_generate(self.members, self.cfg.rule, prompt, cfg, opts, on_tokens, self.state)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalEnsemble":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
