"""Ensembles with one ModelActor per member, each on its own bundle of a placement group:
the driver's side of a request, and what it does when a member's actor dies. Apart from
`cluster.ensemble` (config, member checks, the in-process ensemble) because only this path
needs Ray and has faults to handle.

    with RayEnsemble(EnsembleConfig(("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"), "we:0.5")) as ens:
        result = ens.generate(ens.tokenizer("def fib(n):")["input_ids"], DecodeConfig(max_new_tokens=128))

Per request the driver makes one Ray call to each actor: member 0 leads (runs the decode
loop of `actors.ensemble`, binds a ROUTER), the others serve its score/draft calls over
ZeroMQ (`actors.ensemble_peers`).

Faults: a member dying mid-request makes `generate` raise `EnsembleMemberFailed` naming
it, within about a poll interval (Ray reports the death; nothing waits for a timeout), and
the request is cancelled on every member. Ray restarts the actor (`max_restarts`); the
next request waits for it (`member_ready_s`).
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from cluster.engine import check_prompt
from cluster.ensemble import EnsembleConfig, check_members, check_method, cos_options
from decoding.request import DecodeConfig, GenerationResult, GenerationStats, TokenSink
from protocol import new_session_id


class EnsembleMemberFailed(RuntimeError):
    """An ensemble member's actor died (or failed) during the request. Ray restarts it;
    retry the request."""

    def __init__(self, model: str, detail: str):
        super().__init__(f"ensemble member {model!r} failed during the request ({detail}); Ray is restarting "
                         "it, retry the request")
        self.model = model


class EnsembleTimeout(TimeoutError):
    """The request ran past `request_timeout_s` and was cancelled."""



class RayEnsemble:
    """One ModelActor per member, each on its own device bundle; member 0 leads requests."""

    def __init__(self, cfg: EnsembleConfig):
        import ray

        from actors.model_actor import ModelActor
        from cluster.pipeline import ensure_ray
        from cluster.placement import place

        self.cfg = cfg
        self.info = check_members(cfg)  # before any actor loads a model
        self.tokenizer = self.info.tokenizer
        ensure_ray()
        self.actors: list = []
        self.placement = place(cfg.placement)
        secret = secrets.token_hex(32)  # signs tcp links when members sit on several nodes
        try:
            for index, model in enumerate(cfg.models):
                options = self.placement.actor_options(index)
                self.actors.append(ray.remote(ModelActor).options(
                    **options, max_restarts=cfg.max_restarts, max_concurrency=4).remote(
                    {"model": model, "dtype": cfg.dtype, "max_len": cfg.max_len, "secret": secret}))
            self.member_info = ray.get([a.info.remote() for a in self.actors], timeout=cfg.load_timeout_s)
        except BaseException:
            self.close()
            raise

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def runtime_info(self) -> dict:
        from cluster.pipeline import actor_runtime

        return {"members": {name: actor_runtime(info) for name, info in zip(self.cfg.models, self.member_info)}}

    def generate(self, prompt: list[int], cfg: DecodeConfig, method: str = "cos",
                 on_tokens: TokenSink | None = None) -> GenerationResult:
        """Decode `prompt` with the ensemble. `on_tokens` gets each batch of committed tokens
        as the leader commits it; if it raises, the request is cancelled on every member and
        the exception propagates; if it returns True, the request ends after the current
        round."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        from cluster.pipeline import _call_restarting

        check_method(method)
        check_prompt(len(prompt), cfg.max_new_tokens, self.info.context_length)
        start = time.perf_counter()
        deadline = time.monotonic() + self.cfg.request_timeout_s
        session = new_session_id()
        leader, followers = self.actors[0], list(range(1, len(self.actors)))
        for index, actor in enumerate(self.actors):  # wait for members Ray is restarting
            try:
                _call_restarting(actor.ping.remote, self.cfg.member_ready_s)
            except (RayActorError, GetTimeoutError) as exc:
                raise EnsembleMemberFailed(self.cfg.models[index], f"not available: {type(exc).__name__}") from exc
        infos = ray.get([a.info.remote() for a in self.actors], timeout=self.cfg.member_ready_s)
        endpoint = ray.get(leader.listen.remote(infos[1]["node_ip"]), timeout=self.cfg.member_ready_s)
        if any(info["node_ip"] != infos[0]["node_ip"] for info in infos[1:]):
            endpoint = ray.get(leader.listen.remote("remote"), timeout=self.cfg.member_ready_s)  # tcp for all
        decode = cfg.to_dict()
        cos = cos_options(self.cfg, self.info.default_proposer, cfg.draft_length)
        spec = {"method": method, "combine": self.cfg.combine, "names": list(self.cfg.models), "index": 0,
                "followers": followers, "cos": dataclasses.asdict(cos)}
        refs = [self.actors[i].ensemble_follow.remote(session, endpoint, decode, i) for i in followers]
        chunks = leader.ensemble_lead_stream.remote(session, endpoint, prompt, decode, spec, refs)

        def cancel_all() -> None:
            for actor in self.actors:
                actor.cancel.remote(session)

        def dead_follower() -> int | None:
            for i, ref in zip(followers, refs):
                if ray.wait([ref], timeout=0)[0]:
                    try:
                        ray.get(ref, timeout=0)
                    except RayError:
                        return i
            return None

        stopping = False
        try:
            while True:  # token chunks, then the answer
                if not ray.wait([chunks], timeout=min(0.5, max(0.0, deadline - time.monotonic())))[0]:
                    if time.monotonic() > deadline:
                        raise EnsembleTimeout(f"no result within {self.cfg.request_timeout_s:.0f} s; "
                                              "request cancelled")
                    lost = dead_follower()
                    if lost is not None:
                        raise EnsembleMemberFailed(self.cfg.models[lost], "its actor died")
                    continue
                chunk = ray.get(next(chunks))
                if "stats" in chunk:
                    answer = chunk
                    break
                if on_tokens is not None and not stopping and on_tokens(chunk["token_ids"]) is True:
                    leader.stop.remote(session)  # end after this round, answer with stats
                    stopping = True
        except RayActorError as exc:
            cancel_all()
            raise EnsembleMemberFailed(self.cfg.models[0], f"the leading member's actor died: "
                                                          f"{type(exc).__name__}") from exc
        except RayError as exc:  # the leader raised: a member was lost, or a real error
            cancel_all()
            lost = dead_follower()
            if lost is None:
                lost = next((i for i, m in enumerate(self.cfg.models) if f"member {m!r} failed" in str(exc)), None)
            if lost is not None:
                raise EnsembleMemberFailed(self.cfg.models[lost], "its actor died") from exc
            raise
        except BaseException:
            cancel_all()
            raise
        stats = GenerationStats(**answer["stats"])
        stats.wall_s = time.perf_counter() - start  # as the caller saw it, Ray calls included
        for ref in refs:  # the members are done once the leader is; never wait long
            try:
                ray.get(ref, timeout=10)
            except (RayError, GetTimeoutError):
                pass
        return GenerationResult(answer["token_ids"], stats)

    def close(self) -> None:
        import ray

        from cluster.placement import release

        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)
        if getattr(self, "placement", None) is not None:
            release(self.placement)

    def __enter__(self) -> "RayEnsemble":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
