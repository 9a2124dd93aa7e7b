"""The Ray pipelines, driver side: place a verifier and a drafter actor, run requests.

    pipeline = RayPipeline(PipelineConfig("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"))
    result = pipeline.generate(prompt_ids, DecodeConfig(max_new_tokens=128), PipelineOptions(mode="async"))

Per request the driver makes one Ray call to each actor (`draft`, `verify`) and waits for
the verifier's answer; the tokens themselves travel between the actors over ZeroMQ.

Faults. Actors restart (Ray `max_restarts`), so:
- the drafter dies mid-request: the verifier notices (its `draft` call's ObjectRef fails)
  and finishes target-only, same output; the next request waits for the restarted drafter.
- the verifier dies: `generate` raises `VerifierFailed` at once (Ray reports the death),
  the drafter's session is cancelled, and the next request goes to the restarted verifier.
- the verifier hangs (alive, not answering: SIGSTOP, a wedged thread): the request
  raises `RequestTimeout` at its deadline; a verifier that then fails a ping is killed so
  Ray restarts it, and the next request waits for the new one.
- nothing waits forever: the request has `request_timeout_s`, the drafter joins within
  `drafter_ready_s` or the request runs target-only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass, field

from actors.pipeline_options import PipelineOptions
from cluster.engine import attention_label
from cluster.placement import Placement, PlacementConfig, place, release
from cluster.spec import check_drafting, check_long_context
from decoding.request import DecodeConfig, GenerationResult, GenerationStats, TokenSink
from protocol import new_session_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    target: str
    draft: str | None  # the drafter actor's model; None with `heads`
    dtype: str = "float32"
    draft_dtype: str = "auto"  # resolved in the drafter actor, on its own device
    max_len: int = 4096
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    max_restarts: int = 3
    load_timeout_s: float = 900.0  # first load may convert a built-in (minutes on a small box)
    request_timeout_s: float = 1800.0
    drafter_ready_s: float = 300.0  # how long a request waits for a (re)starting drafter
    heads: str | None = None  # draft heads (name or directory) in the drafter actor instead of a model
    tree: str = "dynamic"
    attention: str | None = None  # the verifier's: tidal[:BUDGET] is approximate
    draft_attention: str | None = None  # the drafter's: tidal[:BUDGET] (exact output)

    def __post_init__(self) -> None:
        check_drafting(self.draft, self.heads, "sync")
        check_long_context(self.draft, self.heads, self.attention, self.draft_attention, self.target)
        if self.placement.n_actors != 2:
            raise ValueError(f"a draft/verify pipeline places 2 actors, not {self.placement.n_actors}")
        for name in ("load_timeout_s", "request_timeout_s", "drafter_ready_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")


def actor_runtime(info: dict) -> dict:
    """The part of `ModelActor.info()` that says what the actor runs with, on its own device."""
    keys = ("model", "node_ip", "device", "threads", "dtype", "kernels", "capabilities", "threading", "attention",
            "linear")
    return {k: info.get(k) for k in keys}


STUCK_PING_S = 5.0  # a live actor answers a ping (its own thread) at once, even mid-request


class VerifierFailed(RuntimeError):
    """The verifier actor died during the request. Ray restarts it; retry the request."""


class RequestTimeout(TimeoutError):
    """The request ran past `request_timeout_s` and was cancelled."""


def ensure_ray() -> None:
    """Join the cluster this process belongs to (RAY_ADDRESS, e.g. inside a job, or a local
    `ray start`), or start a private one with a small object store: models need the RAM."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return
    try:
        ray.init(address="auto", logging_level=logging.WARNING)
    except ConnectionError:
        ray.init(object_store_memory=256 * 1024**2, include_dashboard=False, logging_level=logging.WARNING)


def _call_restarting(call, timeout_s: float, attempt_s: float | None = None):
    """ray.get(call()), retried while the actor is restarting (ActorUnavailableError),
    for at most `timeout_s` in all. A dead actor or the deadline raises. With `attempt_s`
    (idempotent calls only) the call is also sent again after each `attempt_s` without an
    answer: a call sent while a killed actor is going down may never be answered."""
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout_s
    while True:
        left = max(0.0, deadline - time.monotonic())
        try:
            return ray.get(call(), timeout=left if attempt_s is None else min(left, attempt_s))
        except (ActorUnavailableError, GetTimeoutError):
            if time.monotonic() >= deadline:
                raise GetTimeoutError(f"actor still restarting after {timeout_s:.0f} s") from None
            time.sleep(0.2)


class RayPipeline:
    """A verifier actor and a drafter actor, each on its own device bundle."""

    def __init__(self, cfg: PipelineConfig):
        import ray

        from actors.model_actor import ModelActor

        ensure_ray()
        self.cfg = cfg
        self._verifier_restarting = False
        self.placement: Placement = place(cfg.placement)
        secret = secrets.token_hex(32)  # authenticates the tcp link (protocol.link_auth) across nodes

        def start(index: int, model: str, dtype: str, attention: str | None):
            options = self.placement.actor_options(index)
            return ray.remote(ModelActor).options(**options, max_restarts=cfg.max_restarts, max_concurrency=4).remote(
                {"model": model, "dtype": dtype, "max_len": cfg.max_len, "secret": secret, "attention": attention})

        try:
            self.verifier = start(0, cfg.target, cfg.dtype, cfg.attention)
            if cfg.heads is None:
                self.drafter = start(1, cfg.draft, cfg.draft_dtype, cfg.draft_attention)
            else:
                self.drafter = self._start_heads(secret)
            self.verifier_info, self.drafter_info = ray.get(
                [self.verifier.info.remote(), self.drafter.info.remote()], timeout=cfg.load_timeout_s)
        except BaseException:
            self.close()
            raise

    def _start_heads(self, secret: str):
        """The heads' actor, its trees sized from the verifier's measured cost per tree size."""
        import ray

        from actors.heads_actor import HeadsActor
        from cluster.engine import EngineConfig, heads_dir

        path = heads_dir(EngineConfig(self.cfg.target, heads=self.cfg.heads, tree=self.cfg.tree))
        verify_ms = ray.get(self.verifier.verify_costs.remote([1, 2, 4, 8, 16, 32, 64]),
                            timeout=self.cfg.load_timeout_s)
        return ray.remote(HeadsActor).options(**self.placement.actor_options(1), max_restarts=self.cfg.max_restarts,
                                              max_concurrency=4).remote(
            {"target": self.cfg.target, "heads_dir": str(path), "tree": self.cfg.tree, "verify_ms": verify_ms,
             "secret": secret})

    def generate(self, prompt: list[int], cfg: DecodeConfig, options: PipelineOptions,
                 on_tokens: TokenSink | None = None, speculative: bool = True) -> GenerationResult:
        """Decode `prompt`. `on_tokens` gets each batch of committed tokens as the verifier
        commits it (streaming); if it raises, the request is cancelled on both actors and
        the exception propagates; if it returns True, the request ends after the current
        round (the answer may hold a few tokens past that point). `speculative=False`: the target alone,
        drafter idle."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        start = time.perf_counter()
        deadline = time.monotonic() + self.cfg.request_timeout_s
        session = new_session_id()
        if self.cfg.heads is not None:
            options = dataclasses.replace(options, heads=True)  # the verifier sends hidden states
        decode, opts = cfg.to_dict(), options.to_dict()
        # A (re)starting verifier is waited for, within the request's deadline.
        wait_s = min(self.cfg.drafter_ready_s, self.cfg.request_timeout_s)
        try:
            if self._verifier_restarting:  # killed as stuck: wait for the new one first
                _call_restarting(self.verifier.ping.remote, wait_s, attempt_s=STUCK_PING_S)
                self._verifier_restarting = False
            endpoint = _call_restarting(lambda: self.verifier.listen.remote(self.drafter_info["node_ip"]),
                                        max(0.0, deadline - time.monotonic()))
        except GetTimeoutError as exc:
            self._restart_if_stuck()
            raise RequestTimeout(f"the verifier did not answer within {self.cfg.request_timeout_s:.0f} s; "
                                 "request cancelled") from exc
        except RayActorError as exc:
            raise VerifierFailed(f"the verifier actor is not available ({type(exc).__name__}); "
                                 "retry once Ray has restarted it") from exc
        draft_ref = None
        if speculative and self._drafter_ready():
            draft_ref = self.drafter.draft.remote(session, endpoint, decode, opts)
        chunks = self.verifier.verify_stream.remote(session, endpoint, prompt, decode, opts,
                                                    [draft_ref] if draft_ref is not None else [])
        stopping = False
        try:
            while True:  # token chunks, then the answer
                if not ray.wait([chunks], timeout=max(0.0, deadline - time.monotonic()))[0]:
                    self._restart_if_stuck()
                    raise RequestTimeout(f"no result within {self.cfg.request_timeout_s:.0f} s; request cancelled")
                chunk = ray.get(next(chunks))
                if "stats" in chunk:
                    answer = chunk
                    break
                if on_tokens is not None and not stopping and on_tokens(chunk["token_ids"]) is True:
                    self.verifier.stop.remote(session)  # finish the round, answer with stats
                    stopping = True
        except RayActorError as exc:
            self.drafter.cancel.remote(session)
            raise VerifierFailed(f"the verifier actor died during the request ({type(exc).__name__}); Ray is "
                                 "restarting it, retry the request") from exc
        except BaseException:
            self.verifier.cancel.remote(session)
            self.drafter.cancel.remote(session)
            raise
        stats = GenerationStats(**answer["stats"])
        if speculative:
            self._merge_drafter_stats(draft_ref, stats)
        else:
            stats.drafter_lost = False  # no drafter was asked
        stats.wall_s = time.perf_counter() - start  # as the caller saw it, Ray calls included
        stats.labels.update(attention_label(self.cfg.attention, self.cfg.draft,
                                            self.cfg.draft_attention if speculative else None))
        return GenerationResult(answer["token_ids"], stats)

    def runtime_info(self) -> dict:
        """What each actor resolved on its own device: dtype, kernels, threads, capabilities."""
        return {"target": actor_runtime(self.verifier_info), "draft": actor_runtime(self.drafter_info)}

    def _restart_if_stuck(self) -> None:
        """A request timed out: if the verifier does not even answer a ping (its process
        stopped or hung), every request after it would time out too. Kill it, so Ray
        restarts it and the next request waits for the new one."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        if self._verifier_restarting:
            return  # killed already; a restart that loads a large model takes its time
        try:
            ray.get(self.verifier.ping.remote(), timeout=STUCK_PING_S)
        except GetTimeoutError:
            log.warning("the verifier actor does not answer a ping in %.0f s: restarting it", STUCK_PING_S)
            ray.kill(self.verifier, no_restart=False)
            self._verifier_restarting = True
        except RayError:
            pass  # dead already: Ray restarts it

    def _drafter_ready(self) -> bool:
        """Wait for a (re)starting drafter; without one the request runs target-only."""
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return _call_restarting(self.drafter.ping.remote, self.cfg.drafter_ready_s)
        except (RayActorError, GetTimeoutError) as exc:
            log.warning("drafter unavailable (%s); decoding with the target alone", type(exc).__name__)
            return False

    def _merge_drafter_stats(self, draft_ref, stats: GenerationStats) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        if draft_ref is None:
            return
        try:
            drafted = ray.get(draft_ref, timeout=30)
        except (RayError, GetTimeoutError) as exc:
            stats.drafter_lost = True
            log.warning("drafter failed during the request: %s", type(exc).__name__)
            return
        stats.draft_s = drafted.get("draft_s", 0.0)
        stats.rollbacks = drafted.get("rollbacks", 0)
        stats.tree_build_s = drafted.get("build_s", 0.0)
        stats.predraft_hits, stats.predraft_misses = drafted.get("hits", 0), drafted.get("misses", 0)
        stats.predraft_hit_ranks = list(drafted.get("hit_ranks", []))
        stats.predrafted_tokens, stats.predraft_wasted = drafted.get("predrafted", 0), drafted.get("wasted", 0)

    def close(self) -> None:
        import ray

        for name in ("verifier", "drafter"):
            actor = getattr(self, name, None)
            if actor is not None:
                ray.kill(actor, no_restart=True)
        release(self.placement)

    def __enter__(self) -> "RayPipeline":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
