"""The one factory: the decoder a `DecoderSpec` describes.

Each way of decoding is one entry of `BUILDERS`, chosen by `spec.kind`; a spec with
`batch` gets the batched engine, else the same engine serves one request at a time
behind a `SerialDecoder`. Decoders built with one
`ModelPool` share the weights they load in this process (a bench builds one per method).
"""

from __future__ import annotations

from typing import Callable

from cluster.baselines import hf_decoder, llamacpp_decoder
from cluster.decoder import Decoder, SerialDecoder
from cluster.models import ModelPool
from cluster.spec import DecoderSpec


def _ensemble(spec: DecoderSpec, progress: bool, models: ModelPool) -> Decoder:
    from cluster.ensemble import EnsembleConfig, LocalEnsemble
    from cluster.placement import PlacementConfig
    from cluster.ray_ensemble import RayEnsemble

    placement = None if spec.pipeline == "local" else PlacementConfig(
        n_actors=len(spec.ensemble), accelerator=spec.accelerator, cpus_per_actor=spec.cpus_per_actor,
        spread=spec.spread)
    cfg = EnsembleConfig(models=tuple(spec.ensemble), combine=spec.combine, dtype=spec.dtype,
                         max_len=spec.max_len or 4096, placement=placement, request_timeout_s=spec.request_timeout_s)
    if spec.pipeline == "local" and spec.batch is not None:  # CoS batched: every member in this process
        from cluster.batching.ensemble import ensemble_engine

        return ensemble_engine(cfg, spec.batch, progress)
    if spec.batch is not None:  # CoS batched: the proposer here, every other member in its own actor
        from cluster.batching.ensemble_actors import placed_ensemble_engine

        return placed_ensemble_engine(cfg, spec.batch, placement, progress)
    ens = LocalEnsemble(cfg, progress=progress) if spec.pipeline == "local" else RayEnsemble(cfg)

    def ensemble_generate(prompt_ids, cfg, speculative, on_tokens):
        return ens.generate(prompt_ids, cfg, method="cos" if speculative else "ensemble", on_tokens=on_tokens)

    return SerialDecoder(ens, ensemble_generate, ens.tokenizer, ens.info.context_length,
                         getattr(ens, "eos_token_ids", ()) or ())


def _local(spec: DecoderSpec, progress: bool, models: ModelPool) -> Decoder:
    from cluster.batching.engine import BatchEngine
    from cluster.engine import EngineConfig, LocalEngine

    local = LocalEngine(EngineConfig(spec.target, spec.draft, spec.dtype, spec.draft_dtype, spec.max_len,
                                     heads=spec.heads, tree=spec.tree, attention=spec.attention,
                                     draft_attention=spec.draft_attention), progress=progress, models=models)
    if spec.batch is not None:
        return BatchEngine(local, spec.batch)
    if local.ngram:  # prompt lookup has no single-request loop: the batched engine, one slot
        from cluster.batching.scheduler import BatchConfig

        return BatchEngine(local, BatchConfig(max_seqs=1))
    return SerialDecoder(local, local.generate, local.tokenizer, local.context_length, local.eos_token_ids)


def _ray_pipeline(spec: DecoderSpec, progress: bool, models: ModelPool) -> Decoder:
    from actors import loading
    from actors.pipeline_options import PipelineOptions
    from cluster.pipeline import PipelineConfig, RayPipeline
    from cluster.placement import PlacementConfig

    placement = PlacementConfig(n_actors=2, accelerator=spec.accelerator, cpus_per_actor=spec.cpus_per_actor,
                                spread=spec.spread)
    pipe = RayPipeline(PipelineConfig(spec.target, spec.draft, spec.dtype, spec.draft_dtype, spec.max_len or 4096,
                                      placement=placement, request_timeout_s=spec.request_timeout_s,
                                      heads=spec.heads, tree=spec.tree, attention=spec.attention,
                                      draft_attention=spec.draft_attention))
    options = PipelineOptions(mode=spec.pipeline, lookahead=spec.lookahead)

    def pipeline_generate(prompt_ids, cfg, speculative, on_tokens):
        return pipe.generate(prompt_ids, cfg, options, on_tokens=on_tokens, speculative=speculative)

    tokenizer = loading.load_tokenizer(spec.target)
    return SerialDecoder(pipe, pipeline_generate, tokenizer, loading.context_length(loading.read_config(spec.target)),
                         getattr(pipe, "eos_token_ids", ()) or ())


def _remote_drafter(spec: DecoderSpec, progress: bool, models: ModelPool) -> Decoder:
    from cluster.batching.remote import remote_drafter_engine

    return remote_drafter_engine(spec, progress, models)


BUILDERS: dict[str, Callable[[DecoderSpec, bool, ModelPool], Decoder]] = {
    "ensemble": _ensemble, "local": _local, "ray-pipeline": _ray_pipeline, "remote-drafter": _remote_drafter,
    "hf": hf_decoder, "llamacpp": llamacpp_decoder}


def make_decoder(spec: DecoderSpec, progress: bool = False, models: ModelPool | None = None) -> Decoder:
    """`models`: weights already loaded in this process to decode with (else loaded here);
    the Ray pipelines and ensembles load theirs in their actors."""
    return BUILDERS[spec.kind](spec, progress, models or ModelPool())
