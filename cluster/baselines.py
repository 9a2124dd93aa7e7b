"""The peers as decoders (`DecoderSpec.backend`): transformers' `generate`, alone or assisted
by the draft, and llama.cpp's binaries on the same GGUF files. `specray bench` times them
through `Decoder.generate`, as it times our methods, so every row of a report comes from
the same interface.
"""

from __future__ import annotations

import time

import torch

from actors import hardware, loading
from cluster.bench_llamacpp import LlamaCpp, find_binaries
from cluster.decoder import SerialDecoder
from cluster.models import ModelPool
from cluster.spec import DecoderSpec
from decoding.request import DecodeConfig, GenerationResult, GenerationStats, TokenSink


def _greedy_only(cfg: DecodeConfig, who: str) -> None:
    if cfg.sampling.temperature != 0:
        raise ValueError(f"{who} is compared greedily here; temperature must be 0")


class HFGenerate:
    """transformers' `generate` on the target's Hugging Face model (the very tensors our
    engine wraps, from the pool); with a draft, as its `assistant_model`."""

    def __init__(self, spec: DecoderSpec, progress: bool, models: ModelPool):
        self.target = models.load(spec.target, spec.dtype, progress)
        self.assistant = None
        if spec.draft is not None:
            draft = models.load(spec.draft, spec.draft_dtype, progress)
            if draft.hf_model is None:  # transformers needs a dense draft: bf16 where native, else fp32
                dense = "bfloat16" if hardware.probe("cpu").native_bf16 else "float32"
                draft = models.load(spec.draft, dense, progress)
            self.assistant = draft.hf_model

    def generate(self, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool = True,
                 on_tokens: TokenSink | None = None) -> GenerationResult:
        _greedy_only(cfg, "transformers' generate")
        inputs = torch.tensor([prompt_ids])
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=False, attention_mask=torch.ones_like(inputs))
        if self.assistant is not None and speculative:
            kwargs["assistant_model"] = self.assistant
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.target.hf_model.generate(inputs, **kwargs)
        tokens = out[0, len(prompt_ids):].tolist()
        return GenerationResult(tokens, GenerationStats(new_tokens=len(tokens), wall_s=time.perf_counter() - start))

    def runtime_info(self) -> dict:
        model = self.target.hf_model
        return {"target": {"dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                           "backend": "transformers"}}


class LlamaCppGenerate:
    """llama.cpp's `llama-completion` (the target alone) or `llama-speculative-simple` (with
    the draft) on our GGUF files, a fresh process per request. It answers text: the token
    ids are that text encoded again, the token count and time are llama.cpp's own (prompt
    processing plus generation, model loading excluded, as ours)."""

    def __init__(self, spec: DecoderSpec, tokenizer):
        self.method = "llamacpp-spec" if spec.draft else "llamacpp"
        draft = loading.gguf_file(spec.draft) if spec.draft else None
        self.cpp = LlamaCpp(find_binaries(spec.llamacpp, [self.method]), loading.gguf_file(spec.target), draft,
                            torch.get_num_threads())
        self.tokenizer = tokenizer

    def generate(self, prompt_ids: list[int], cfg: DecodeConfig, speculative: bool = True,
                 on_tokens: TokenSink | None = None) -> GenerationResult:
        _greedy_only(cfg, "llama.cpp")
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)  # special tokens are parsed again
        run = self.cpp.run(self.method if speculative else "llamacpp", prompt, cfg.max_new_tokens)
        tokens = self.tokenizer(run.text, add_special_tokens=False)["input_ids"]
        return GenerationResult(tokens, GenerationStats(new_tokens=run.tokens, wall_s=run.seconds))

    def runtime_info(self) -> dict:
        return {"target": {"dtype": "gguf", "device": "cpu", "backend": f"llama.cpp ({self.cpp.bin})"}}


def hf_decoder(spec: DecoderSpec, progress: bool, models: ModelPool) -> SerialDecoder:
    hf = HFGenerate(spec, progress, models)
    return SerialDecoder(hf, hf.generate, hf.target.tokenizer, hf.target.context_length,
                         loading.eos_token_ids(hf.target))


def llamacpp_decoder(spec: DecoderSpec, progress: bool, models: ModelPool) -> SerialDecoder:
    tokenizer = loading.load_tokenizer(spec.target)  # no weights here: llama.cpp loads its own
    cpp = LlamaCppGenerate(spec, tokenizer)
    return SerialDecoder(cpp, cpp.generate, tokenizer, loading.context_length(loading.read_config(spec.target)))
