"""Ensembles, driver side: n models decoding as one (weighted or contrastive), standard
collaborative decoding (`method="ensemble"`) or CoS (`method="cos"`).

    with RayEnsemble(EnsembleConfig(("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"), "we:0.5")) as ens:
        result = ens.generate(ens.tokenizer("def fib(n):")["input_ids"], DecodeConfig(max_new_tokens=128))

`RayEnsemble`: one ModelActor per member, each on its own bundle of a placement group.
Per request the driver makes one Ray call to each actor: member 0 leads (runs the decode
loop of `actors.ensemble`, binds a ROUTER), the others serve its score/draft calls over
ZeroMQ (`actors.ensemble_peers`). `LocalEnsemble`: the same loops, every model in this
process (`--pipeline local`).

Faults: a member dying mid-request makes `generate` raise `EnsembleMemberFailed` naming
it, within about a poll interval (Ray reports the death; nothing waits for a timeout), and
the request is cancelled on every member. Ray restarts the actor (`max_restarts`); the
next request waits for it (`member_ready_s`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field

from actors import loading, threads
from actors.ensemble import CosOptions, CosState, cos_generate, ensemble_generate, local_members
from actors.hardware import check_dtype_name, probe
from actors.runner import ModelRunner
from cluster.engine import check_prompt
from cluster.placement import PlacementConfig
from decoding.ensemble import CombineRule, parse_combine
from decoding.request import DecodeConfig, GenerationResult, GenerationStats, TokenSink
from protocol import new_session_id

log = logging.getLogger(__name__)

METHODS = ("cos", "ensemble")


@dataclass(frozen=True)
class EnsembleConfig:
    models: tuple[str, ...]
    combine: str
    dtype: str = "float32"
    max_len: int = 4096
    placement: PlacementConfig | None = None  # default: one bundle per member
    proposer: int | None = None  # CoS default proposer; None: the smallest model
    swap_draft_length: int = 1  # CoS: proposals a swapped-in proposer makes (its bonus included)
    role_swap: bool = True
    max_restarts: int = 3
    load_timeout_s: float = 900.0
    request_timeout_s: float = 1800.0
    member_ready_s: float = 300.0  # how long a request waits for a (re)starting member

    def __post_init__(self) -> None:
        models = tuple(self.models.split(",")) if isinstance(self.models, str) else tuple(self.models)
        models = tuple(m.strip() for m in models)
        if len(models) < 2 or not all(models):
            raise ValueError(f"an ensemble needs at least 2 model names, got {list(models)}")
        object.__setattr__(self, "models", models)
        self.rule  # parses, or raises ValueError naming what is wrong
        check_dtype_name(self.dtype)
        placement = self.placement or PlacementConfig(n_actors=len(models))
        if placement.n_actors != len(models):
            raise ValueError(f"an ensemble of {len(models)} models places {len(models)} actors, "
                             f"not {placement.n_actors}")
        object.__setattr__(self, "placement", placement)
        if self.proposer is not None and not 0 <= self.proposer < len(models):
            raise ValueError(f"proposer must index one of the {len(models)} models, got {self.proposer}")
        CosOptions(swap_draft_length=self.swap_draft_length)
        for name in ("load_timeout_s", "request_timeout_s", "member_ready_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")

    @property
    def rule(self) -> CombineRule:
        return parse_combine(self.combine, len(self.models))


def _param_estimate(config) -> int:
    c = config.get_text_config()
    h, layers = c.hidden_size, c.num_hidden_layers
    inter = getattr(c, "intermediate_size", 4 * h)
    return layers * (4 * h * h + 3 * h * inter) + c.vocab_size * h


@dataclass
class Members:
    """What the driver learns about the members before loading any weights."""

    tokenizer: object
    context_length: int
    default_proposer: int
    sizes: list[int] = field(default_factory=list)


def check_members(cfg: EnsembleConfig) -> Members:
    """Refuse unknown models and members that do not share a vocabulary, before loading."""
    for name in cfg.models:
        loading.resolve(name)
    configs = [loading.read_config(name) for name in cfg.models]
    tokenizers = [loading.load_tokenizer(name) for name in cfg.models]
    first = cfg.models[0]
    for name, tok, config in zip(cfg.models[1:], tokenizers[1:], configs[1:]):
        try:
            loading.check_same_vocab(tokenizers[0], tok, configs[0].get_text_config().vocab_size,
                                     config.get_text_config().vocab_size, (first, name))
        except ValueError as exc:
            raise ValueError(f"ensemble members must share a vocabulary (their distributions are combined "
                             f"token by token): {exc}") from None
    sizes = [_param_estimate(c) for c in configs]
    proposer = cfg.proposer if cfg.proposer is not None else min(range(len(sizes)), key=lambda i: (sizes[i], i))
    context = min(loading.context_length(c) for c in configs)
    return Members(tokenizers[0], context, proposer, sizes)


def _cos_options(cfg: EnsembleConfig, proposer: int, draft_length: int | None) -> CosOptions:
    return CosOptions(default_proposer=proposer, swap_draft_length=cfg.swap_draft_length, role_swap=cfg.role_swap)


class EnsembleMemberFailed(RuntimeError):
    """An ensemble member's actor died (or failed) during the request. Ray restarts it;
    retry the request."""

    def __init__(self, model: str, detail: str):
        super().__init__(f"ensemble member {model!r} failed during the request ({detail}); Ray is restarting "
                         "it, retry the request")
        self.model = model


class EnsembleTimeout(TimeoutError):
    """The request ran past `request_timeout_s` and was cancelled."""


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"ensemble method must be one of {METHODS}, got {method!r}")


class LocalEnsemble:
    """Every member in this process: the loops of `actors.ensemble` on ModelRunners."""

    def __init__(self, cfg: EnsembleConfig, progress: bool = True):
        self.cfg = cfg
        self.info = check_members(cfg)
        self.tokenizer = self.info.tokenizer
        loaded = [loading.load(name, cfg.dtype, progress=progress) for name in cfg.models]
        max_len = min(cfg.max_len, self.info.context_length + 64)
        self.runners = [ModelRunner.for_serving(m.build(), max_len, progress) for m in loaded]
        self.members = local_members(self.runners, list(cfg.models))
        self.eos_token_ids = loading.eos_token_ids(loaded[0])
        self.state = CosState()  # learned costs carry over between requests

    def runtime_info(self) -> dict:
        return {"cpu": probe("cpu").to_dict(), "threading": threads.describe(),
                "members": {name: r.runtime_info() for name, r in zip(self.cfg.models, self.runners)}}

    def generate(self, prompt: list[int], cfg: DecodeConfig, method: str = "cos",
                 on_tokens: TokenSink | None = None) -> GenerationResult:
        _check_method(method)
        check_prompt(len(prompt), cfg.max_new_tokens, self.info.context_length)
        if not cfg.eos_token_ids:
            cfg = dataclasses.replace(cfg, eos_token_ids=self.eos_token_ids)
        if method == "ensemble":
            return ensemble_generate(self.members, self.cfg.rule, prompt, cfg, on_tokens)
        opts = _cos_options(self.cfg, self.info.default_proposer, cfg.draft_length)
        return cos_generate(self.members, self.cfg.rule, prompt, cfg, opts, on_tokens, self.state)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalEnsemble":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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

        _check_method(method)
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
        cos = _cos_options(self.cfg, self.info.default_proposer, cfg.draft_length)
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
