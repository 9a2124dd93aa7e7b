"""What a `ModelActor` does with its model: one object per role, all over one `ModelHome`.

- `Verifier`: own a request and verify what a drafter sends (the Ray pipelines);
- `Proposer`: draft for a verifier's request (the Ray pipelines);
- `DraftService`: draft for a batched engine's running sequences, many at once;
- `MemberService`: score a batched ensemble leader's running sequences, many at once;
- `EnsembleMember`: lead or follow an ensemble's request (CoS).

The actor (`actors/model_actor.py`) answers Ray's calls by handing them to its roles. Each
role reads the runner through the home, so a runner swapped in (the oracle bench) is what
every role uses, and one request at a time uses the model (`ModelHome.busy`).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from actors.pipeline_options import Cancelled, PipelineOptions
from actors.proposing import propose_request
from actors.verifying import verify_request
from decoding.draft_length import DraftLengthPolicy
from decoding.request import DecodeConfig, TokenSink
from protocol import ChannelConfig, DealerChannel, ModelFingerprint, Role, RouterChannel, link_auth


@dataclass
class ModelHome:
    """The actor's model and what its roles share."""
    runner: object  # a ModelRunner (or the oracle bench's stand-in)
    fingerprint: ModelFingerprint
    eos_token_ids: tuple[int, ...]
    node_ip: str
    max_len: int
    secret: str | None = None  # hex; authenticates tcp links between nodes (protocol.link_auth)
    busy: threading.Lock = field(default_factory=threading.Lock)  # one request at a time uses the model
    cancelled: set[str] = field(default_factory=set)
    stopped: set[str] = field(default_factory=set)  # end after the current round (a stop string was seen)
    routers: dict[str, RouterChannel] = field(default_factory=dict)  # transport ("ipc"/"tcp") -> bound socket
    # ensemble members' handshakes that came before their request's leader ran (LeaderLink)
    early_handshakes: dict[str, tuple] = field(default_factory=dict)

    def channel_config(self, endpoint: str, binds: bool) -> ChannelConfig:
        return ChannelConfig(tensor_lib="torch", auth=link_auth(endpoint, self.secret, binds=binds))

    def router(self, endpoint: str) -> RouterChannel:
        found = next((r for r in self.routers.values() if r.endpoint == endpoint), None)
        if found is None:
            raise ValueError(f"{endpoint} is not one of this actor's sockets; call listen first")
        return found

    @contextmanager
    def session(self, session: str):
        """Hold the model for one request; forget its cancel and stop marks after."""
        with self.busy:
            try:
                yield lambda: session in self.cancelled
            finally:
                self.cancelled.discard(session)
                self.stopped.discard(session)


class Verifier:
    def __init__(self, home: ModelHome):
        self.home = home

    def verify(self, session: str, endpoint: str, prompt: list[int], decode: dict, options: dict,
               drafter: list, on_tokens: TokenSink | None = None) -> dict:
        """Own the request: decode with the target, verifying what the drafter sends to
        `endpoint` (from `listen`). `drafter` holds the ObjectRef of the drafter's `draft`
        call (empty: no drafter), so a dead drafter is noticed within one poll."""
        import ray

        home = self.home
        cfg, opts = DecodeConfig.from_dict(decode), PipelineOptions(**options)
        if not cfg.eos_token_ids:  # the caller did not choose: the target's own
            cfg.eos_token_ids = home.eos_token_ids
        router = home.router(endpoint)

        def drafter_alive() -> bool:
            return bool(drafter) and not ray.wait(drafter, timeout=0)[0]

        def sink(tokens: list[int]) -> bool:
            if on_tokens is not None:
                on_tokens(tokens)
            return session in home.stopped

        with home.session(session) as cancelled:
            result = verify_request(home.runner, router, home.fingerprint, session, prompt, cfg, opts,
                                    drafter_alive=drafter_alive, cancelled=cancelled, on_tokens=sink)
        return {"token_ids": result.token_ids, "stats": result.stats.to_dict()}


class Proposer:
    def __init__(self, home: ModelHome):
        self.home = home
        self.policies: dict[tuple, DraftLengthPolicy] = {}  # learned draft costs carry over between requests

    def draft(self, session: str, endpoint: str, decode: dict, options: dict) -> dict:
        home = self.home
        cfg, opts = DecodeConfig.from_dict(decode), PipelineOptions(**options)
        key = (cfg.draft_length, cfg.max_draft_length, cfg.tree_width)
        policy = self.policies.setdefault(key, DraftLengthPolicy(
            max_len=cfg.max_draft_length, fixed=cfg.draft_length, tokens_per_node=cfg.tree_width))
        with home.session(session) as cancelled:
            try:
                with DealerChannel(endpoint, config=home.channel_config(endpoint, binds=False)) as channel:
                    return propose_request(home.runner, channel, home.fingerprint, session, cfg, opts, policy,
                                           cancelled=cancelled)
            except Cancelled:
                return {"cancelled": True}


class DraftService:
    def __init__(self, home: ModelHome):
        self.home = home
        self.served: list[tuple[RouterChannel, threading.Thread]] = []

    def serve(self, peer_node_ip: str, slots: int, max_draft: int, verify_s: dict, mode: str = "sync") -> str:
        """Draft for a batched verifier on `peer_node_ip` from now on: many sequences, one
        batched draft forward per depth (`actors/draft_server.py`), on a thread of its own;
        `mode` async drafts ahead on the bet that all is kept, ssd pre-drafts the likeliest
        outcomes (`actors/ssd_server.py`). Returns where to connect."""
        from actors.draft_server import DraftServer, serve_rounds
        from actors.ssd_server import SsdDraftServer

        home = self.home
        kind = SsdDraftServer if mode == "ssd" else DraftServer
        server = kind(home.runner, slots, home.max_len, max_draft, {int(k): float(v) for k, v in verify_s.items()},
                      ahead=mode == "async")
        router, thread = serve_rounds(server, home.node_ip, peer_node_ip, f"drafts-{os.getpid()}-{len(self.served)}",
                                      home.secret, home.fingerprint)
        self.served.append((router, thread))
        return router.endpoint


class MemberService:
    def __init__(self, home: ModelHome):
        self.home = home
        self.served: list[tuple[RouterChannel, threading.Thread]] = []

    def serve(self, peer_node_ip: str, slots: int, max_len: int) -> str:
        """Score a batched ensemble leader's rounds on `peer_node_ip` from now on, many
        sequences in one forward (`actors/member_server.py`), on a thread of its own.
        Returns where to connect."""
        from actors.draft_server import serve_rounds
        from actors.member_server import MemberServer

        home = self.home
        server = MemberServer(home.runner.model, slots, max_len)
        router, thread = serve_rounds(server, home.node_ip, peer_node_ip, f"member-{os.getpid()}-{len(self.served)}",
                                      home.secret, home.fingerprint, role=Role.PEER)
        self.served.append((router, thread))
        return router.endpoint


class EnsembleMember:
    def __init__(self, home: ModelHome):
        self.home = home
        self.cos_states: dict[tuple, object] = {}  # per (rule, members, proposer): what CoS learned

    def lead(self, session: str, endpoint: str, prompt: list[int], decode: dict, spec: dict,
             followers: list, on_tokens: TokenSink | None = None) -> dict:
        """Own an ensemble request (`actors.ensemble`): this actor's model is member
        `spec["index"]`; the others (`spec["names"]`, by index) connect to `endpoint` (from
        `listen`) and serve calls. `followers` holds their `ensemble_follow` ObjectRefs in
        `spec["followers"]` order, so a dead member is noticed within one poll."""
        import ray

        from actors.ensemble import CosOptions, CosState, cos_generate, ensemble_generate
        from actors.ensemble_member import LocalMember
        from actors.ensemble_peers import LeaderLink, PeerOptions, RemoteMember
        from decoding.ensemble import parse_combine

        home = self.home
        cfg, opts = DecodeConfig.from_dict(decode), PeerOptions(**spec.get("peer", {}))
        if not cfg.eos_token_ids:
            cfg.eos_token_ids = home.eos_token_ids
        names = list(spec["names"])
        rule = parse_combine(spec["combine"], len(names))
        router = home.router(endpoint)
        refs = dict(zip(spec["followers"], followers))

        def alive(index: int) -> bool:
            return not ray.wait([refs[index]], timeout=0)[0]

        def stop_aware(tokens: list[int]) -> bool:
            if on_tokens is not None:
                on_tokens(tokens)
            return session in home.stopped

        cancelled = lambda: session in home.cancelled  # noqa: E731
        link = LeaderLink(router, home.fingerprint, session, {i: names[i] for i in refs}, opts, alive, cancelled,
                          early=home.early_handshakes)
        members = [LocalMember(home.runner, name, i) if i == spec["index"] else RemoteMember(link, i, name, session)
                   for i, name in enumerate(names)]
        with home.session(session):
            try:
                link.accept()
                if spec["method"] == "ensemble":
                    result = ensemble_generate(members, rule, prompt, cfg, stop_aware, cancelled)
                else:
                    cos = CosOptions(**spec.get("cos", {}))
                    state = self.cos_states.setdefault((spec["combine"], tuple(names), cos.default_proposer),
                                                       CosState())
                    result = cos_generate(members, rule, prompt, cfg, cos, stop_aware, state, cancelled)
            finally:
                link.close("done")
        return {"token_ids": result.token_ids, "stats": result.stats.to_dict()}

    def follow(self, session: str, endpoint: str, decode: dict, index: int, peer: dict | None = None) -> dict:
        """Serve as ensemble member `index` of the request led at `endpoint`."""
        from actors.ensemble_peers import PeerOptions, serve_member

        home = self.home
        cfg = DecodeConfig.from_dict(decode)
        with home.session(session) as cancelled:
            try:
                with DealerChannel(endpoint, config=home.channel_config(endpoint, binds=False)) as channel:
                    return serve_member(home.runner, channel, home.fingerprint, session, index, cfg,
                                        PeerOptions(**(peer or {})), cancelled=cancelled)
            except Cancelled:
                return {"cancelled": True}
