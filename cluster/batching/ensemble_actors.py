"""An ensemble decoding batched with its members in Ray actors (`ensemble` + `pipeline: sync`
+ batching): CoS in the one round, across devices.

The proposer (the smallest member, or `proposer`) decodes here, in the Serve replica or the
driver: it drafts chains for every running request and scores as a member. Every other
member is a `ModelActor` on its own placement bundle (its own device; its own node with
`spread`) that scores each round's whole batch in one forward over one ZeroMQ link
(`actors/member_server.py` there, `actors/remote_member.py` here), while the proposer
scores its share here at the same time. The ensemble verifies as in `pipeline: local`
(`EnsembleVerifier`), so the output is the ensemble's, token for token under greedy.
"""

from __future__ import annotations

import secrets

from actors import loading
from actors.drafters.draft_model import DraftModelDrafter
from actors.ensemble_verifier import EnsembleVerifier
from actors.remote_member import RemoteMember
from actors.runner import ModelRunner
from cluster.batching.engine import BatchEngine
from cluster.batching.ensemble import COST_SIZES
from cluster.batching.scheduler import BatchConfig
from cluster.engine import EngineConfig
from cluster.ensemble import EnsembleConfig, check_members
from cluster.placement import PlacementConfig
from protocol import ChannelConfig, DealerChannel, link_auth, model_fingerprint


class PlacedEnsemble:
    """What the batched engine reads of a loaded target, for an ensemble whose proposer is
    loaded here and whose other members run in actors."""

    def __init__(self, cfg: EnsembleConfig, progress: bool = False):
        self.ensemble_cfg = cfg
        self.info = check_members(cfg)  # before anything loads
        self.proposer = self.info.default_proposer
        self.tokenizer, self.context_length = self.info.tokenizer, self.info.context_length
        loaded = loading.load(cfg.models[self.proposer], cfg.dtype, progress=progress)
        max_len = min(cfg.max_len, self.context_length + 64)
        self.target_runner = ModelRunner.for_serving(loaded.build(), max_len, progress)
        self.draft_runner = None
        self.cfg = EngineConfig(cfg.models[self.proposer], max_len=cfg.max_len)
        self.eos_token_ids: tuple[int, ...] = tuple(loading.eos_token_ids(loaded))  # member 0's, once known
        self.member_info: dict[str, dict] = {}
        self.verify_costs: dict[int, float] = {}

    def runtime_info(self) -> dict:
        from cluster.pipeline import actor_runtime

        members = {name: actor_runtime(info) for name, info in self.member_info.items()}
        members[self.ensemble_cfg.models[self.proposer]] = {**self.target_runner.runtime_info(),
                                                            "where": "this process (the proposer)"}
        return {"members": members, "ensemble": {"combine": self.ensemble_cfg.rule.describe(), "batched": True,
                                                 "proposer": self.ensemble_cfg.models[self.proposer],
                                                 "where": "members in their own actors"}}


def placed_ensemble_engine(cfg: EnsembleConfig, batch: BatchConfig, placement: PlacementConfig,
                           progress: bool = False) -> BatchEngine:
    import ray

    from actors.model_actor import ModelActor
    from cluster.pipeline import ensure_ray
    from cluster.placement import place, release

    here = PlacedEnsemble(cfg, progress)
    others = [i for i in range(len(cfg.models)) if i != here.proposer]
    max_len = min(cfg.max_len, here.context_length)
    room = max_len + 2 * batch.max_draft + 3  # what BatchEngine gives each sequence: max_len, the drafts, the tree
    ensure_ray()
    # spread: each member on a node of its own, none on this one (where the proposer decodes)
    this_node = ray.get_runtime_context().get_node_id()
    group = place(PlacementConfig(n_actors=len(others), accelerator=placement.accelerator,
                                  cpus_per_actor=placement.cpus_per_actor, spread=placement.spread,
                                  apart_from=this_node if placement.spread else None))
    secret = secrets.token_hex(32)  # authenticates the tcp links (protocol.link_auth) across nodes
    actors: list = []
    try:
        node = ray.util.get_node_ip_address()
        for bundle, index in enumerate(others):
            actors.append(ray.remote(ModelActor).options(**group.actor_options(bundle), max_concurrency=4).remote(
                {"model": cfg.models[index], "dtype": cfg.dtype, "max_len": room, "secret": secret}))
        infos = ray.get([a.info.remote() for a in actors], timeout=cfg.load_timeout_s)
        costs = ray.get([a.verify_costs.remote(list(COST_SIZES)) for a in actors], timeout=cfg.load_timeout_s)
        endpoints = ray.get([a.serve_member.remote(node, batch.max_seqs, room) for a in actors],
                            timeout=cfg.load_timeout_s)
        runner = here.target_runner
        fingerprint = model_fingerprint(runner.vocab_size, here.tokenizer.get_vocab())
        # members score in parallel: a round costs what the slowest one does
        mine = runner.measure_verify_costs(COST_SIZES)
        here.verify_costs = {k: max([mine[k]] + [c[k] / 1e3 for c in costs]) for k in COST_SIZES}
        if here.proposer != 0:
            here.eos_token_ids = tuple(infos[others.index(0)]["eos_token_ids"])
        members: list = [None] * len(cfg.models)
        members[here.proposer] = runner.model
        watches = [a.watch.remote() for a in actors]
        for actor, index, info, endpoint, watch in zip(actors, others, infos, endpoints, watches):
            here.member_info[cfg.models[index]] = info
            channel = DealerChannel(endpoint, config=ChannelConfig(
                tensor_lib="torch", auth=link_auth(endpoint, secret, binds=False)))
            members[index] = RemoteMember(channel, fingerprint, cfg.models[index], timeout_s=cfg.request_timeout_s,
                                          alive=lambda w=watch: not ray.wait([w], timeout=0)[0], info=info)

        def stop() -> None:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            release(group)

        drafter = DraftModelDrafter(runner.model, batch.max_seqs, max_len + batch.max_draft + 2, batch.max_draft)
        drafter.measure(runner, here.verify_costs)
        return BatchEngine(here, batch, drafter=drafter,
                           verifier=lambda r: EnsembleVerifier(members, cfg.rule, batch.max_seqs, r, on_close=stop))
    except BaseException:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        release(group)
        raise
