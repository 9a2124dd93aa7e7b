"""A Ray actor that owns one model, its KV cache and its device. Role-agnostic.

The same class verifies (`verify`: owns a request, binds a ROUTER the drafter connects
to) or proposes (`draft`: connects a DEALER to a verifier); which one is decided per
request by the pipeline, so ensembles can rotate roles. Ray only creates, places and
restarts it and carries one call per request each way; every per-step message goes
over ZeroMQ straight between the two actors (`actors.verifying`, `actors.proposing`).

The actor is threaded (Ray `max_concurrency` > 1) only so that `cancel`, `ping` and
`info` answer while a request runs; one request at a time uses the model.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from actors import hardware, loading, threads
from actors.proposing import propose_request
from actors.runner import ModelRunner
from actors.tidal import TidalConfig, check_spec
from actors.verifying import Cancelled, PipelineOptions, verify_request
from decoding.draft_length import DraftLengthPolicy
from decoding.request import DecodeConfig, TokenSink
from protocol import (
    ChannelConfig,
    DealerChannel,
    RouterChannel,
    SharedSecret,
    bind_endpoint,
    model_fingerprint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSpec:
    model: str
    dtype: str = "float32"
    max_len: int = 4096
    secret: str | None = None  # hex; signs every frame on tcp links between nodes
    attention: str | None = None  # tidal[:BUDGET]: this model attends sparsely (see actors.tidal)

    def __post_init__(self) -> None:
        hardware.check_dtype_name(self.dtype)
        check_spec(self.attention)
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")


class ModelActor:
    def __init__(self, spec: dict):
        import ray
        import transformers

        from actors.resources import assigned_cpus, assigned_device

        transformers.utils.logging.disable_progress_bar()  # actor stderr goes to the driver's console
        self.spec = ActorSpec(**spec)
        # One thread per assigned core: two actors on a 2-core box must not fight over cores.
        self.threads = assigned_cpus()
        torch.set_num_threads(self.threads)
        self.device = assigned_device()
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        # `auto` resolves here, on this actor's own device: nodes of one cluster differ.
        loaded = loading.load(self.spec.model, self.spec.dtype, progress=False, device=self.device)
        if loaded.hf_model is not None:
            loaded.hf_model.to(self.device)
        self.loaded = loaded
        max_len = min(self.spec.max_len, loaded.context_length + 64)
        n_layers = loaded.config.get_text_config().num_hidden_layers
        attention = TidalConfig.parse(self.spec.attention, n_layers) if self.spec.attention else None
        self.runner = ModelRunner.for_serving(loaded.build(), max_len, attention=attention)
        self.eos_token_ids = loading.eos_token_ids(loaded)
        self.fingerprint = model_fingerprint(self.runner.vocab_size, loaded.tokenizer.get_vocab())
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._busy = threading.Lock()
        self._cancelled: set[str] = set()
        self._stopped: set[str] = set()
        self._routers: dict[str, RouterChannel] = {}  # transport ("ipc"/"tcp") -> bound socket
        self._policies: dict[tuple, DraftLengthPolicy] = {}  # learned draft costs carry over
        self._served: list[tuple[RouterChannel, threading.Thread]] = []  # draft servers (serve_drafts)

    # ---- control plane (Ray calls) --------------------------------------------------
    def ping(self) -> bool:
        return True

    def watch(self) -> None:
        """Never returns: a caller holding this call's reference learns the moment this
        actor's process is gone (the reference resolves with an error)."""
        threading.Event().wait()

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_ip": self.node_ip, "node_id": self.node_id, "device": self.device,
                "gpu_ids": self.gpu_ids, "threads": self.threads, "model": self.spec.model,
                "capabilities": hardware.probe(self.device).to_dict(), "threading": threads.describe(),
                **self.runner.runtime_info()}

    def cancel(self, session: str) -> None:
        self._cancelled.add(session)

    def verify_costs(self, sizes: list[int]) -> dict[int, float]:
        """Milliseconds of one target forward of k tokens, per k: sizes a heads drafter's trees."""
        with self._busy:
            return {k: s * 1e3 for k, s in self.runner.measure_verify_costs(tuple(sizes)).items()}

    def stop(self, session: str) -> None:
        """End `session` after its current round and answer normally (a stop string was seen)."""
        self._stopped.add(session)

    def _channel_config(self, endpoint: str) -> ChannelConfig:
        auth = None
        if endpoint.startswith("tcp://") and self.spec.secret:
            auth = SharedSecret(bytes.fromhex(self.spec.secret))
        return ChannelConfig(tensor_lib="torch", auth=auth)

    def listen(self, peer_node_ip: str) -> str:
        """Where a drafter on `peer_node_ip` should connect: ipc on this node, else tcp."""
        transport = "ipc" if peer_node_ip == self.node_ip else "tcp"
        if transport not in self._routers:
            endpoint = bind_endpoint(self.node_ip, peer_node_ip, name=f"verifier-{os.getpid()}")
            self._routers[transport] = RouterChannel(endpoint, config=self._channel_config(endpoint))
        return self._routers[transport].endpoint

    def serve_drafts(self, peer_node_ip: str, slots: int, max_draft: int, verify_s: dict, ahead: bool = False) -> str:
        """Draft for a batched verifier on `peer_node_ip` from now on: many sequences, one
        batched draft forward per depth (`actors/draft_server.py`), on a thread of its own.
        `verify_s`: the target's verify seconds by tokens; `ahead`: draft each sequence's
        next round while the verifier verifies (`pipeline: async`). Returns where to connect."""
        from actors.draft_server import DraftServer, serve_rounds

        server = DraftServer(self.runner, slots, self.spec.max_len, max_draft,
                             {int(k): float(v) for k, v in verify_s.items()}, ahead=ahead)
        router, thread = serve_rounds(server, self.node_ip, peer_node_ip, f"drafts-{os.getpid()}-{len(self._served)}",
                                      self.spec.secret, self.fingerprint)
        self._served.append((router, thread))
        return router.endpoint

    # ---- requests --------------------------------------------------------------------
    def verify(self, session: str, endpoint: str, prompt: list[int], decode: dict, options: dict,
               drafter: list, on_tokens: TokenSink | None = None) -> dict:
        """Own the request: decode with the target, verifying what the drafter sends to
        `endpoint` (from `listen`). `drafter` holds the ObjectRef of the drafter's `draft`
        call (empty: no drafter), so a dead drafter is noticed within one poll."""
        import ray

        cfg, opts = DecodeConfig.from_dict(decode), PipelineOptions(**options)
        if not cfg.eos_token_ids:  # the caller did not choose: the target's own
            cfg.eos_token_ids = self.eos_token_ids
        router = next((r for r in self._routers.values() if r.endpoint == endpoint), None)
        if router is None:
            raise ValueError(f"{endpoint} is not one of this actor's sockets; call listen first")

        def drafter_alive() -> bool:
            return bool(drafter) and not ray.wait(drafter, timeout=0)[0]

        def sink(tokens: list[int]) -> bool:
            if on_tokens is not None:
                on_tokens(tokens)
            return session in self._stopped

        with self._busy:
            try:
                result = verify_request(self.runner, router, self.fingerprint, session, prompt, cfg, opts,
                                        drafter_alive=drafter_alive, cancelled=lambda: session in self._cancelled,
                                        on_tokens=sink)
            finally:
                self._cancelled.discard(session)
                self._stopped.discard(session)
        return {"token_ids": result.token_ids, "stats": result.stats.to_dict()}

    def verify_stream(self, session: str, endpoint: str, prompt: list[int], decode: dict, options: dict,
                      drafter: list):
        """`verify` as a Ray streaming generator: `{"token_ids": [...]}` per commit as the
        tokens land, then `verify`'s answer."""
        yield from _streamed(session, lambda sink: self.verify(session, endpoint, prompt, decode, options,
                                                               drafter, on_tokens=sink))

    def draft(self, session: str, endpoint: str, decode: dict, options: dict) -> dict:
        cfg, opts = DecodeConfig.from_dict(decode), PipelineOptions(**options)
        key = (cfg.draft_length, cfg.max_draft_length, cfg.tree_width)
        policy = self._policies.setdefault(key, DraftLengthPolicy(
            max_len=cfg.max_draft_length, fixed=cfg.draft_length, tokens_per_node=cfg.tree_width))
        with self._busy:
            try:
                with DealerChannel(endpoint, config=self._channel_config(endpoint)) as channel:
                    return propose_request(self.runner, channel, self.fingerprint, session, cfg, opts, policy,
                                           cancelled=lambda: session in self._cancelled)
            except Cancelled:
                return {"cancelled": True}
            finally:
                self._cancelled.discard(session)

    # ---- benchmarks ------------------------------------------------------------------
    def use_oracle(self, reference: list[int], acceptance: float, step_cost_s: float, seed: int) -> None:
        """Draft with an `actors.oracle.OracleRunner` (controlled acceptance and cost, greedy
        only) instead of the model; the fingerprint stays the loaded model's."""
        from actors.oracle import OracleRunner

        with self._busy:
            self.runner = OracleRunner(reference, self.runner.vocab_size, acceptance, step_cost_s, seed)

    # ---- ensembles (CoS): one member per actor, one of them leads ------------------------
    def ensemble_lead(self, session: str, endpoint: str, prompt: list[int], decode: dict, spec: dict,
                      followers: list, on_tokens: TokenSink | None = None) -> dict:
        """Own an ensemble request (`actors.ensemble`): this actor's model is member
        `spec["index"]`; the others (`spec["names"]`, by index) connect to `endpoint` (from
        `listen`) and serve calls. `followers` holds their `ensemble_follow` ObjectRefs in
        `spec["followers"]` order, so a dead member is noticed within one poll."""
        import ray

        from actors.ensemble import CosOptions, CosState, LocalMember, cos_generate, ensemble_generate
        from actors.ensemble_peers import LeaderLink, PeerOptions, RemoteMember
        from decoding.ensemble import parse_combine

        cfg, opts = DecodeConfig.from_dict(decode), PeerOptions(**spec.get("peer", {}))
        if not cfg.eos_token_ids:
            cfg.eos_token_ids = self.eos_token_ids
        names = list(spec["names"])
        rule = parse_combine(spec["combine"], len(names))
        router = next((r for r in self._routers.values() if r.endpoint == endpoint), None)
        if router is None:
            raise ValueError(f"{endpoint} is not one of this actor's sockets; call listen first")
        refs = dict(zip(spec["followers"], followers))

        def alive(index: int) -> bool:
            return not ray.wait([refs[index]], timeout=0)[0]

        cancelled = lambda: session in self._cancelled  # noqa: E731
        link = LeaderLink(router, self.fingerprint, session, {i: names[i] for i in refs}, opts, alive, cancelled)
        members = [LocalMember(self.runner, name, i) if i == spec["index"] else RemoteMember(link, i, name, session)
                   for i, name in enumerate(names)]
        with self._busy:
            try:
                link.accept()
                if spec["method"] == "ensemble":
                    result = ensemble_generate(members, rule, prompt, cfg, on_tokens, cancelled)
                else:
                    cos = CosOptions(**spec.get("cos", {}))
                    states = self.__dict__.setdefault("_cos_states", {})
                    state = states.setdefault((spec["combine"], tuple(names), cos.default_proposer), CosState())
                    result = cos_generate(members, rule, prompt, cfg, cos, on_tokens, state, cancelled)
            finally:
                link.close("done")
                self._cancelled.discard(session)
                self._stopped.discard(session)
        return {"token_ids": result.token_ids, "stats": result.stats.to_dict()}

    def ensemble_lead_stream(self, session: str, endpoint: str, prompt: list[int], decode: dict, spec: dict,
                             followers: list):
        """`ensemble_lead` as a Ray streaming generator, like `verify_stream`."""
        def lead(sink: TokenSink) -> dict:
            def stop_aware(tokens: list[int]) -> bool:
                sink(tokens)
                return session in self._stopped  # see `stop`

            return self.ensemble_lead(session, endpoint, prompt, decode, spec, followers, on_tokens=stop_aware)

        yield from _streamed(session, lead)

    def ensemble_follow(self, session: str, endpoint: str, decode: dict, index: int, peer: dict | None = None) -> dict:
        """Serve as ensemble member `index` of the request led at `endpoint`."""
        from actors.ensemble_peers import PeerOptions, serve_member

        cfg = DecodeConfig.from_dict(decode)
        with self._busy:
            try:
                with DealerChannel(endpoint, config=self._channel_config(endpoint)) as channel:
                    return serve_member(self.runner, channel, self.fingerprint, session, index, cfg,
                                        PeerOptions(**(peer or {})), cancelled=lambda: session in self._cancelled)
            except Cancelled:
                return {"cancelled": True}
            finally:
                self._cancelled.discard(session)


def _streamed(session: str, run: Callable[[TokenSink], dict]):
    """Yield `{"token_ids": [...]}` for each batch `run` passes its sink, then `run`'s
    answer. `run` works on its own thread, so a slow reader never stalls decoding."""
    chunks: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            chunks.put(("done", run(lambda tokens: chunks.put(("tokens", list(tokens))))))
        except BaseException as exc:  # handed to the reader below
            chunks.put(("error", exc))

    threading.Thread(target=work, name=f"decode-{session[:8]}", daemon=True).start()
    while True:
        kind, value = chunks.get()
        if kind == "tokens":
            yield {"token_ids": value}
        elif kind == "done":
            yield value
            return
        else:
            raise value
