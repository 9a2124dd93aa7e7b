"""The decoder behind one replica, chosen by the Serve config:

- `pipeline: local`: target and draft in the replica's own process (`LocalEngine`);
- `pipeline: sync|async`: a verifier and a drafter actor, each on its own device bundle
  (`RayPipeline`); the replica only routes; with `heads`, the drafter actor holds only the
  draft heads (sync);
- `ensemble: [A, B, ...]`: CoS over the members, in the replica (`pipeline: local`,
  `LocalEnsemble`) or one actor per member (`RayEnsemble`); `speculative: false` runs
  standard collaborative decoding (every model, every token).

All three take one request at a time and call `on_tokens` as tokens are committed.
"""

from __future__ import annotations

from actors import loading
from actors.verifying import PipelineOptions
from cluster.engine import encode_prompt
from cluster.placement import PlacementConfig
from cluster.serve.config import ServeArgs
from decoding.request import DecodeConfig, GenerationResult, TokenSink


class Backend:
    def __init__(self, args: ServeArgs):
        self.args = args
        if args.ensemble is not None:
            from cluster.ensemble import EnsembleConfig, LocalEnsemble, RayEnsemble

            placement = PlacementConfig(n_actors=len(args.ensemble), accelerator=args.accelerator,
                                        cpus_per_actor=args.cpus_per_actor, spread=args.spread)
            cfg = EnsembleConfig(models=tuple(args.ensemble), combine=args.combine, dtype=args.dtype,
                                 max_len=args.max_len, placement=placement, request_timeout_s=args.request_timeout_s)
            self.decoder = LocalEnsemble(cfg, progress=False) if args.pipeline == "local" else RayEnsemble(cfg)
            self.tokenizer = self.decoder.tokenizer
            self.context = self.decoder.info.context_length
        elif args.pipeline == "local":
            import torch

            from cluster.engine import EngineConfig, LocalEngine
            from cluster.placement import assigned_cpus

            torch.set_num_threads(assigned_cpus())
            self.decoder = LocalEngine(EngineConfig(args.target, args.draft, args.dtype, args.draft_dtype,
                                                    args.max_len, heads=args.heads, tree=args.tree,
                                                    attention=args.attention, draft_attention=args.draft_attention),
                                       progress=False)
            self.tokenizer, self.context = self.decoder.tokenizer, self.decoder.context_length
        else:
            from cluster.pipeline import PipelineConfig, RayPipeline

            placement = PlacementConfig(n_actors=2, accelerator=args.accelerator,
                                        cpus_per_actor=args.cpus_per_actor, spread=args.spread)
            self.decoder = RayPipeline(PipelineConfig(args.target, args.draft, args.dtype, args.draft_dtype,
                                                      args.max_len, placement=placement,
                                                      request_timeout_s=args.request_timeout_s,
                                                      heads=args.heads, tree=args.tree, attention=args.attention,
                                                      draft_attention=args.draft_attention))
            self.options = PipelineOptions(mode=args.pipeline, lookahead=args.lookahead)
            self.tokenizer = loading.load_tokenizer(args.target)
            self.context = loading.context_length(loading.read_config(args.target))
        self.vocab_size = len(self.tokenizer)
        # what the models resolved to where they run (dtypes, kernels, devices): for /health
        self.runtime = self.decoder.runtime_info()

    # ---- prompts (cheap; the request handler calls these before queueing) ---------------
    def encode_text(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat=False)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def check(self, prompt_ids: list[int], max_tokens: int) -> None:
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(prompt_ids) + max_tokens > self.context:
            raise ValueError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                             f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}")
        if len(prompt_ids) + max_tokens > self.args.max_len:
            raise ValueError(f"this endpoint's max_len is {self.args.max_len} tokens (prompt + max_tokens; the "
                             f"context limit it serves); the prompt has {len(prompt_ids)} tokens and max_tokens "
                             f"is {max_tokens}")

    # ---- decoding (on the replica's decode thread) -------------------------------------
    def generate(self, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool,
                 on_tokens: TokenSink) -> GenerationResult:
        if self.args.ensemble is not None:
            return self.decoder.generate(prompt_ids, cfg, method="cos" if speculative else "ensemble",
                                         on_tokens=on_tokens)
        if self.args.pipeline == "local":
            return self.decoder.generate(prompt_ids, cfg, speculative=speculative, on_tokens=on_tokens)
        return self.decoder.generate(prompt_ids, cfg, self.options, on_tokens=on_tokens, speculative=speculative)

    def close(self) -> None:
        close = getattr(self.decoder, "close", None)
        if close is not None:
            close()
