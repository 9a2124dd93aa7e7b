"""The batched engine with its drafter in a Ray actor of its own (`pipeline: sync`, `async`).

The target decodes here (the Serve replica, or the driver), batched as in `pipeline: local`;
the drafter lives in an actor on its own placement bundle (its own device, its own node
with `spread`) and drafts for every running request at once over one ZeroMQ link:
a draft model in a `ModelActor` (`actors/draft_server.py` there, `actors/drafters/remote.py`
here), or draft heads in a `HeadsActor` (`actors/heads_server.py` there,
`actors/drafters/remote_heads.py` here: each call carries the target's hidden state).
`pipeline: async`: the draft model drafts each sequence's next round while the target
verifies this one, betting its drafts are all accepted (`DraftServer(ahead=True)`).

A drafter actor that dies is restarted by Ray (`max_restarts`), and so is one that lives
but stops answering (stopped, wedged: `STUCK_FLOOR_S` in `actors/drafters/remote.py`); the
engine decodes on without drafts meanwhile and reconnects to the new incarnation's server
once it is up.
"""

from __future__ import annotations

import logging
import secrets

from actors.drafters.remote import RemoteDrafter
from actors.drafters.remote_heads import RemoteHeadsDrafter
from cluster.batching.engine import BatchEngine
from cluster.engine import EngineConfig, LocalEngine, heads_dir
from cluster.models import ModelPool
from protocol import ChannelConfig, DealerChannel, describe_link, link_auth, model_fingerprint

log = logging.getLogger(__name__)

HEADS_TREE_SIZES = (1, 2, 4, 8, 16, 32, 64)  # the verify costs a heads tree is sized by
DRAFTER_RESTARTS = 3  # crashes of the drafter actor Ray recovers from; after that the target decodes alone


def remote_drafter_engine(spec, progress: bool = False, models: ModelPool | None = None) -> BatchEngine:
    """`spec`: a `DecoderSpec` with a target, `batch` (a BatchConfig) and a draft model or heads."""
    import ray

    from actors.heads_actor import HeadsActor
    from actors.model_actor import ModelActor
    from cluster.pipeline import ensure_ray
    from cluster.placement import PlacementConfig, place, release

    local = LocalEngine(EngineConfig(spec.target, dtype=spec.dtype, max_len=spec.max_len, attention=spec.attention),
                        progress=progress, models=models)
    sizes = HEADS_TREE_SIZES if spec.draft is None else (1, 2, 4, 8, 16)
    if any(k not in local.verify_costs for k in sizes):  # a target loaded alone has not measured them all
        local.verify_costs = {**local.verify_costs, **local.target_runner.measure_verify_costs(sizes)}
    max_len = min(local.cfg.max_len or local.context_length, local.context_length)
    ensure_ray()
    # spread: the drafter on a node of its own, not this one (where the target decodes)
    this_node = ray.get_runtime_context().get_node_id()
    placement = place(PlacementConfig(n_actors=1, accelerator=spec.accelerator, cpus_per_actor=spec.cpus_per_actor,
                                      spread=spec.spread, apart_from=this_node if spec.spread else None))
    secret = secrets.token_hex(32)  # authenticates the tcp link (protocol.link_auth) across nodes
    actor = None
    # one actor method blocks for the actor's life: its reference resolves (with an error)
    # once the actor's process is gone, which is how a crash is seen at once
    watch: list = []
    link: dict = {}  # the drafter's endpoint and how it authenticates: for /health
    try:
        cfg, here = spec.batch, ray.util.get_node_ip_address()
        options = {**placement.actor_options(0), "max_concurrency": 4, "max_restarts": DRAFTER_RESTARTS}
        if spec.draft is not None:
            actor = ray.remote(ModelActor).options(**options).remote(
                {"model": spec.draft, "dtype": spec.draft_dtype, "max_len": max_len + cfg.max_draft + 2,
                 "attention": spec.draft_attention, "secret": secret})

            def serve() -> dict:
                return {"endpoint": ray.get(actor.serve_drafts.remote(
                    here, cfg.max_seqs, cfg.max_draft, local.verify_costs, mode=spec.pipeline),
                    timeout=900)}
        else:
            path = heads_dir(EngineConfig(spec.target, heads=spec.heads, tree=spec.tree))
            verify_ms = {k: v * 1e3 for k, v in local.verify_costs.items()}
            actor = ray.remote(HeadsActor).options(**options).remote(
                {"target": spec.target, "heads_dir": str(path), "tree": spec.tree, "verify_ms": verify_ms,
                 "secret": secret})

            def serve() -> dict:
                return ray.get(actor.serve_heads.remote(here), timeout=900)

        def connect() -> tuple[DealerChannel, dict]:
            served = serve()
            watch[:] = [actor.watch.remote()]
            endpoint = served["endpoint"]
            auth = link_auth(endpoint, secret, binds=False)
            link.update(describe_link(endpoint, auth))
            return DealerChannel(endpoint, config=ChannelConfig(tensor_lib="torch", auth=auth)), served

        def alive() -> bool:
            return not ray.wait(watch, timeout=0)[0]

        def reconnect() -> DealerChannel:
            if alive():  # it stopped answering but lives (stopped, wedged): restart it, as Ray does a crash
                log.warning("the drafter actor is stuck; restarting it")
                ray.kill(actor, no_restart=False)
            ray.wait(watch)
            channel = connect()[0]
            info.update(ray.get(actor.info.remote(), timeout=60), link=dict(link))  # /health: the new process
            return channel

        def stop() -> None:
            ray.kill(actor, no_restart=True)
            release(placement)

        channel, served = connect()
        sizing = {"max_draft": cfg.max_draft} if spec.draft is not None else {
            "max_draft": served["n_heads"], "n_heads": served["n_heads"], "max_nodes": served["max_nodes"]}
        fingerprint = model_fingerprint(local.target_runner.vocab_size, local.tokenizer.get_vocab())
        info = {**ray.get(actor.info.remote(), timeout=60), "link": dict(link)}
        kind = RemoteDrafter if spec.draft is not None else RemoteHeadsDrafter
        drafter = kind(channel, fingerprint, on_close=stop, info=info, reconnect=reconnect, alive=alive, **sizing)
        drafter.pre_drafts = spec.pipeline == "ssd"
        engine = BatchEngine(local, cfg, drafter=drafter)
        engine.attends = (spec.attention, spec.draft, spec.draft_attention)
        return engine
    except BaseException:
        if actor is not None:
            ray.kill(actor, no_restart=True)
        release(placement)
        raise
