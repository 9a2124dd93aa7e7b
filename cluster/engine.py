"""Load a target (and optionally a draft) once and serve generation requests on them.

Checks that cost nothing run first: model names, sampling settings, vocabularies, prompt
length. Only then are weights loaded. The draft's dtype defaults to `auto`: bf16 where the
device runs it natively (it halves the bytes each draft step reads), else fp32. The draft
only proposes, so its precision cannot change the output.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from actors import hardware, loading, threads
from actors.runner import ModelRunner
from actors.tidal import TidalConfig
from cluster.local import DecodeConfig, GenerationResult, autoregressive_generate, heads_generate, speculative_generate
from cluster.models import ModelPool
from cluster.spec import MODEL_FREE_DRAFTS, NGRAM, SELF, check_drafting, check_long_context
from decoding.draft_length import DraftLengthPolicy
from decoding.request import TokenSink


@dataclass(frozen=True)
class EngineConfig:
    target: str
    draft: str | None = None
    dtype: str = "float32"  # the target's precision defines "the target"
    draft_dtype: str = "auto"  # bf16 where the device runs it natively, else fp32
    max_len: int | None = None  # longest request (prompt + new tokens); None: the model's context
    heads: str | None = None  # draft heads (built-in name or directory) on the target's hidden states
    more_heads: tuple[str, ...] = ()  # further heads to load beside them (a bench compares kinds)
    tree: str = "dynamic"  # the heads' candidate trees: static | dynamic
    attention: str | None = None  # the target's own: tidal[:BUDGET] is approximate (never the default)
    draft_attention: str | None = None  # the drafting side's: tidal[:BUDGET] (exact output: the target verifies)

    def __post_init__(self) -> None:
        from actors.head_drafter import TREES

        for name in ("dtype", "draft_dtype"):
            hardware.check_dtype_name(getattr(self, name), name)
        if self.tree not in TREES:
            raise ValueError(f"tree must be one of {', '.join(TREES)}, got {self.tree!r}")
        if self.draft in MODEL_FREE_DRAFTS:  # heads beside a draft model may load (a bench compares them)
            check_drafting(self.draft, self.heads, "local")
        check_long_context(self.draft, self.heads, self.attention, self.draft_attention, self.target)
        if self.draft == SELF and self.draft_attention is None:
            object.__setattr__(self, "draft_attention", "tidal")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 tokens, got {self.max_len}")

    @property
    def self_drafting(self) -> bool:
        return self.draft == SELF

    @property
    def draft_model(self) -> str | None:
        """The draft model's name; None when drafts come from no model (self, ngram) or none."""
        return None if self.draft in MODEL_FREE_DRAFTS else self.draft


def attention_label(attention: str | None, draft: str | None, draft_attention: str | None) -> dict:
    """What output stats say about attention: exact unless the target itself attends sparsely."""
    label = {"attention": attention or "full", "approximate": attention is not None}
    if draft_attention is not None:
        label["draft_attention"] = ("self " if draft == SELF else "") + draft_attention
    return label


def check_models(cfg: EngineConfig):
    """Refuse unknown models and mismatched vocabularies before any weights load.
    Returns the target's tokenizer, so callers can check the prompt next."""
    loading.resolve(cfg.target)
    loading.check_gguf(cfg.target, cfg.dtype, "--dtype")
    tokenizer = loading.load_tokenizer(cfg.target)
    n_layers = loading.read_config(cfg.target).get_text_config().num_hidden_layers
    for spec in (cfg.attention, cfg.draft_attention if cfg.self_drafting else None):
        if spec is not None:
            TidalConfig.parse(spec, n_layers)
    if cfg.draft_model is not None:
        loading.resolve(cfg.draft)
        loading.check_gguf(cfg.draft, cfg.draft_dtype, "--draft-dtype")
        loading.check_same_vocab(
            tokenizer,
            loading.load_tokenizer(cfg.draft),
            loading.read_config(cfg.target).get_text_config().vocab_size,
            loading.read_config(cfg.draft).get_text_config().vocab_size,
            (cfg.target, cfg.draft),
        )
    for name in heads_names(cfg):
        heads_dir(cfg, name)
    return tokenizer


def heads_names(cfg: EngineConfig) -> list[str]:
    return ([cfg.heads] if cfg.heads is not None else []) + [h for h in cfg.more_heads if h != cfg.heads]


def heads_dir(cfg: EngineConfig, name: str | None = None):
    """The heads' directory, refused (naming both models) if trained for another target."""
    from actors.heads import check_heads, resolve_heads

    text = loading.read_config(cfg.target).get_text_config()
    path = resolve_heads(name or cfg.heads, cfg.target)
    check_heads(path, cfg.target, text.hidden_size, text.vocab_size)
    return path


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return tokenizer(prompt)["input_ids"]


def check_prompt(n_prompt: int, max_new_tokens: int, context: int, max_len: int | None = None) -> None:
    """Before any prefill: the request must fit the model's context and the configured max_len."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty after tokenization")
    if n_prompt + max_new_tokens > context:
        raise ValueError(
            f"prompt of {n_prompt} tokens plus max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {context} tokens"
        )
    if max_len is not None and n_prompt + max_new_tokens > max_len:
        raise ValueError(
            f"prompt of {n_prompt} tokens plus max-new-tokens {max_new_tokens} exceeds max_len={max_len} "
            f"(--max-len): raise it, up to the model's context of {context}"
        )


def node_of_this_process() -> dict:
    """{"node_ip": ...} in a process joined to a Ray cluster (a Serve replica, a job's driver
    whose drafter runs on another node), else {}: reports say where each model ran."""
    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is None or not ray.is_initialized():
        return {}
    return {"node_ip": ray.util.get_node_ip_address()}


class LocalEngine:
    """Draft and target in this process, sharing weights with their Hugging Face models."""

    def __init__(self, cfg: EngineConfig, progress: bool = True, models: ModelPool | None = None):
        """`models`: where the weights come from, shared with other engines (a bench's
        methods); by default this engine loads its own."""
        self.cfg = cfg
        models = models or ModelPool()
        self.target = models.load(cfg.target, cfg.dtype, progress=progress)
        self.tokenizer = self.target.tokenizer
        self.context_length = self.target.context_length
        max_len = min(cfg.max_len or self.context_length, self.context_length) + 64
        n_layers = self.target.config.get_text_config().num_hidden_layers
        attention = TidalConfig.parse(cfg.attention, n_layers) if cfg.attention else None
        self.target_runner = ModelRunner.for_serving(self.target.build(), max_len, progress, attention)
        self.draft = self.draft_runner = None
        # `--draft self`: the target drafts for itself, sparsely, over its own cache
        self.self_draft = TidalConfig.parse(cfg.draft_attention, n_layers) if cfg.self_drafting else None
        self.ngram = cfg.draft == NGRAM  # prompt lookup: drafts from the tokens, in the batched engine
        if cfg.draft_model is not None:
            self.draft = models.load(cfg.draft, cfg.draft_dtype, progress=progress)
            loading.check_same_vocab(
                self.tokenizer, self.draft.tokenizer, self.target.vocab_size, self.draft.vocab_size,
                (cfg.target, cfg.draft),
            )
            draft_layers = self.draft.config.get_text_config().num_hidden_layers
            self.draft_runner = ModelRunner.for_serving(
                self.draft.build(), max_len, progress,
                TidalConfig.parse(cfg.draft_attention, draft_layers) if cfg.draft_attention else None)
        from actors.head_kinds import load_heads

        self.heads_sets = {name: load_heads(heads_dir(cfg, name), self.target_runner.model)
                           for name in heads_names(cfg)}
        self.heads = self.heads_sets.get(cfg.heads)
        self.eos_token_ids = loading.eos_token_ids(self.target)
        # How verify cost grows with tokens on this target: seeds every draft-length policy,
        # and sizes the heads' trees (up to 64 nodes).
        sizes = (1, 2, 4, 8, 16, 32, 64) if self.heads_sets else (1, 2, 4, 8, 16)
        speculates = (self.draft_runner is not None or bool(self.heads_sets) or self.self_draft is not None
                      or self.ngram)
        self.verify_costs = dict(models.measured(
            ("verify_costs", cfg.target, cfg.dtype, cfg.attention, sizes),
            lambda: self.target_runner.measure_verify_costs(sizes))) if speculates else {}
        self.head_drafters: dict[tuple[str, str], object] = {}
        # Learned costs and calibration carry over between requests.
        self.policies: dict[tuple, DraftLengthPolicy] = {}

    def runtime_info(self) -> dict:
        """Resolved dtypes, devices, kernels per shape class, threading: for stats and reports."""
        info = {"cpu": hardware.probe("cpu").to_dict(), "threading": threads.describe(),
                "target": {**self.target_runner.runtime_info(), **node_of_this_process()}}
        if self.target_runner.attention is not None:
            info["target"]["attention"] = self.target_runner.attention.describe() + ", approximate"
        if self.self_draft is not None:
            info["self_draft"] = self.self_draft.describe()
        if self.draft_runner is not None:
            info["draft"] = self.draft_runner.runtime_info()
        described = {name: {"kind": h.cfg.kind, "n_heads": h.n_heads, "hot_vocab": h.cfg.hot_vocab,
                            "trained_for": h.cfg.target} for name, h in self.heads_sets.items()}
        if self.heads is not None:
            info["heads"] = described[self.cfg.heads]
        if len(described) > 1:
            info["heads_sets"] = described
        if self.verify_costs:
            info["target"]["verify_ms"] = {k: round(s * 1e3, 2) for k, s in self.verify_costs.items()}
        return info

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def head_drafter(self, tree: str, heads: str | None = None):
        """One drafter per heads and tree kind, kept across requests (static shapes are built
        once, dynamic calibration carries over)."""
        from actors.head_drafter import HeadDrafter

        key = (heads or self.cfg.heads, tree)
        if key not in self.head_drafters:
            if key[0] not in self.heads_sets:
                raise ValueError(f"heads {key[0]!r} are not loaded in this engine ({', '.join(self.heads_sets)})")
            self.head_drafters[key] = HeadDrafter(self.heads_sets[key[0]], tree, verify_s=self.verify_costs)
        return self.head_drafters[key]

    def generate(
        self, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool = True, on_tokens: TokenSink | None = None,
        tree: str | None = None, heads: str | None = None,
    ) -> GenerationResult:
        """`tree`: draft with the heads (static | dynamic), `heads` naming which loaded set
        (default: the configured one); default: the draft model if there is one, else the
        heads with the configured tree."""
        check_prompt(len(prompt_ids), cfg.max_new_tokens, self.context_length, self.cfg.max_len)
        result = self._generate(prompt_ids, cfg, speculative, on_tokens, tree, heads)
        c = self.cfg
        labels = attention_label(c.attention, c.draft, c.draft_attention if speculative else None)
        result.stats.labels.update(labels)
        return result

    def _generate(self, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool, on_tokens: TokenSink | None,
                  tree: str | None, heads: str | None) -> GenerationResult:
        if not cfg.eos_token_ids:
            cfg = dataclasses.replace(cfg, eos_token_ids=self.eos_token_ids)
        if speculative and self.heads is not None and (tree is not None or self.draft_runner is None):
            return heads_generate(self.target_runner, self.head_drafter(tree or self.cfg.tree, heads), prompt_ids,
                                  cfg, on_tokens)
        if tree is not None:
            raise ValueError(f"tree {tree!r} needs heads; this engine has none")
        if speculative and self.ngram:
            raise ValueError("--draft ngram decodes in the batched engine: build it with cluster.factory.make_decoder")
        if not speculative or (self.draft_runner is None and self.self_draft is None):
            return autoregressive_generate(self.target_runner, prompt_ids, cfg, on_tokens)
        key = (cfg.draft_length, cfg.max_draft_length, cfg.tree_width)
        if key not in self.policies:
            self.policies[key] = DraftLengthPolicy(
                max_len=cfg.max_draft_length, fixed=cfg.draft_length, tokens_per_node=cfg.tree_width
            )
            self.policies[key].costs.verify_s.update(self.verify_costs)
        if self.self_draft is not None:
            return speculative_generate(self.target_runner, self.target_runner, prompt_ids, cfg, self.policies[key],
                                        on_tokens, self_draft=self.self_draft)
        return speculative_generate(
            self.target_runner, self.draft_runner, prompt_ids, cfg, self.policies[key], on_tokens
        )
