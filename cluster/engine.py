"""Load a target (and optionally a draft) once and serve generation requests on them.

Checks that cost nothing run first: model names, sampling settings, vocabularies, prompt
length. Only then are weights loaded. The draft's dtype defaults to `auto`: bf16 where the
device runs it natively (it halves the bytes each draft step reads), else fp32. The draft
only proposes, so its precision cannot change the output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


from actors import hardware, loading, threads
from actors.runner import ModelRunner
from cluster.local import DecodeConfig, GenerationResult, autoregressive_generate, speculative_generate
from decoding.request import TokenSink
from decoding.draft_length import DraftLengthPolicy


@dataclass(frozen=True)
class EngineConfig:
    target: str
    draft: str | None = None
    dtype: str = "float32"  # the target's precision defines "the target"
    draft_dtype: str = "auto"  # bf16 where the device runs it natively, else fp32
    max_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("dtype", "draft_dtype"):
            hardware.check_dtype_name(getattr(self, name), name)


def check_models(cfg: EngineConfig):
    """Refuse unknown models and mismatched vocabularies before any weights load.
    Returns the target's tokenizer, so callers can check the prompt next."""
    loading.resolve(cfg.target)
    loading.check_gguf(cfg.target, cfg.dtype, "--dtype")
    tokenizer = loading.load_tokenizer(cfg.target)
    if cfg.draft is not None:
        loading.resolve(cfg.draft)
        loading.check_gguf(cfg.draft, cfg.draft_dtype, "--draft-dtype")
        loading.check_same_vocab(
            tokenizer,
            loading.load_tokenizer(cfg.draft),
            loading.read_config(cfg.target).get_text_config().vocab_size,
            loading.read_config(cfg.draft).get_text_config().vocab_size,
            (cfg.target, cfg.draft),
        )
    return tokenizer


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return tokenizer(prompt)["input_ids"]


def check_prompt(n_prompt: int, max_new_tokens: int, context: int) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt is empty after tokenization")
    if n_prompt + max_new_tokens > context:
        raise ValueError(
            f"prompt of {n_prompt} tokens plus max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {context} tokens"
        )


class LocalEngine:
    """Draft and target in this process, sharing weights with their Hugging Face models."""

    def __init__(self, cfg: EngineConfig, progress: bool = True, target: loading.LoadedModel | None = None):
        """`target`: an already loaded target to share (e.g. a verifier actor's), else it loads."""
        self.cfg = cfg
        self.target = target or loading.load(cfg.target, cfg.dtype, progress=progress)
        self.tokenizer = self.target.tokenizer
        self.context_length = self.target.context_length
        max_len = min(cfg.max_len, self.context_length + 64)
        self.target_runner = ModelRunner.for_serving(self.target.build(), max_len, progress)
        self.draft = self.draft_runner = None
        if cfg.draft is not None:
            self.draft = loading.load(cfg.draft, cfg.draft_dtype, progress=progress)
            loading.check_same_vocab(
                self.tokenizer, self.draft.tokenizer, self.target.vocab_size, self.draft.vocab_size,
                (cfg.target, cfg.draft),
            )
            self.draft_runner = ModelRunner.for_serving(self.draft.build(), max_len, progress)
        self.eos_token_ids = loading.eos_token_ids(self.target)
        # How verify cost grows with tokens on this target: seeds every draft-length policy.
        self.verify_costs = self.target_runner.measure_verify_costs() if self.draft_runner is not None else {}
        # Learned costs and calibration carry over between requests.
        self.policies: dict[tuple, DraftLengthPolicy] = {}

    def runtime_info(self) -> dict:
        """Resolved dtypes, devices, kernels per shape class, threading: for stats and reports."""
        info = {"cpu": hardware.probe("cpu").to_dict(), "threading": threads.describe(),
                "target": self.target_runner.runtime_info()}
        if self.draft_runner is not None:
            info["draft"] = self.draft_runner.runtime_info()
            info["target"]["verify_ms"] = {k: round(s * 1e3, 2) for k, s in self.verify_costs.items()}
        return info

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(
        self, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool = True, on_tokens: TokenSink | None = None
    ) -> GenerationResult:
        check_prompt(len(prompt_ids), cfg.max_new_tokens, self.context_length)
        if not cfg.eos_token_ids:
            cfg = dataclasses.replace(cfg, eos_token_ids=self.eos_token_ids)
        if not speculative or self.draft_runner is None:
            return autoregressive_generate(self.target_runner, prompt_ids, cfg, on_tokens)
        key = (cfg.draft_length, cfg.max_draft_length, cfg.tree_width)
        if key not in self.policies:
            self.policies[key] = DraftLengthPolicy(
                max_len=cfg.max_draft_length, fixed=cfg.draft_length, tokens_per_node=cfg.tree_width
            )
            self.policies[key].costs.verify_s.update(self.verify_costs)
        return speculative_generate(
            self.target_runner, self.draft_runner, prompt_ids, cfg, self.policies[key], on_tokens
        )
