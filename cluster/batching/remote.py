"""The batched engine with its draft model in a Ray actor of its own (`pipeline: sync`).

The target decodes here (the Serve replica, or the driver), batched as in `pipeline: local`;
the draft model lives in a `ModelActor` on its own placement bundle (its own device, its own
node with `spread`) and drafts for every running request at once over one ZeroMQ link
(`actors/draft_server.py` there, `actors/drafters/remote.py` here).
"""

from __future__ import annotations

import secrets

from actors.drafters.remote import RemoteDrafter
from cluster.batching.engine import BatchEngine
from cluster.engine import EngineConfig, LocalEngine
from protocol import ChannelConfig, DealerChannel, SharedSecret, model_fingerprint


def remote_draft_engine(spec, progress: bool = False) -> BatchEngine:
    """`spec`: a `DecoderSpec` with a target, a draft model and `batch` (a BatchConfig)."""
    import ray

    from actors.model_actor import ModelActor
    from cluster.pipeline import ensure_ray
    from cluster.placement import PlacementConfig, place, release

    local = LocalEngine(EngineConfig(spec.target, dtype=spec.dtype, max_len=spec.max_len), progress=progress)
    if not local.verify_costs:  # a target loaded alone has not measured them: the draft's policy needs them
        local.verify_costs = local.target_runner.measure_verify_costs((1, 2, 4, 8, 16))
    max_len = min(local.cfg.max_len or local.context_length, local.context_length)
    ensure_ray()
    placement = place(PlacementConfig(n_actors=1, accelerator=spec.accelerator, cpus_per_actor=spec.cpus_per_actor,
                                      spread=spec.spread))
    secret = secrets.token_hex(32)  # signs the tcp link when the draft sits on another node
    actor = None
    try:
        actor = ray.remote(ModelActor).options(**placement.actor_options(0), max_concurrency=4).remote(
            {"model": spec.draft, "dtype": spec.draft_dtype, "max_len": max_len + spec.batch.max_draft + 2,
             "secret": secret})
        cfg = spec.batch
        endpoint = ray.get(actor.serve_drafts.remote(ray.util.get_node_ip_address(), cfg.max_seqs, cfg.max_draft,
                                                     local.verify_costs), timeout=900)
        auth = SharedSecret(bytes.fromhex(secret)) if endpoint.startswith("tcp://") else None
        channel = DealerChannel(endpoint, config=ChannelConfig(tensor_lib="torch", auth=auth))
        runner = local.target_runner
        fingerprint = model_fingerprint(runner.vocab_size, local.tokenizer.get_vocab())

        def stop() -> None:
            channel.close()
            ray.kill(actor, no_restart=True)
            release(placement)

        info = ray.get(actor.info.remote(), timeout=60)
        drafter = RemoteDrafter(channel, fingerprint, cfg.max_draft, on_close=stop, info=info)
        return BatchEngine(local, cfg, drafter=drafter)
    except BaseException:
        if actor is not None:
            ray.kill(actor, no_restart=True)
        release(placement)
        raise
