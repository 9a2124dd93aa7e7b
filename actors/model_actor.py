"""A Ray actor that owns one model, its KV cache and its device. Role-agnostic.

The actor holds the model (`ModelHome`) and one object per role it can play
(`actors/actor_roles.py`): it verifies (`verify`: owns a request, binds a ROUTER the drafter
connects to), proposes (`draft`: connects a DEALER to a verifier), drafts for a batched
engine (`serve_drafts`), or leads or follows an ensemble's request; which one is decided
per request by the caller, so ensembles can rotate roles. Ray only creates, places and
restarts it and carries one call per request each way; every per-step message goes over
ZeroMQ straight between the actors (`actors.verifying`, `actors.proposing`).

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
from actors.actor_roles import DraftService, EnsembleMember, MemberService, ModelHome, Proposer, Verifier
from actors.runner import ModelRunner
from actors.tidal import TidalConfig, check_spec
from decoding.request import TokenSink
from protocol import RouterChannel, bind_endpoint, model_fingerprint

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
        max_len = min(self.spec.max_len, loaded.context_length + 64)
        n_layers = loaded.config.get_text_config().num_hidden_layers
        attention = TidalConfig.parse(self.spec.attention, n_layers) if self.spec.attention else None
        runner = ModelRunner.for_serving(loaded.build(), max_len, attention=attention)
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.home = ModelHome(runner, model_fingerprint(runner.vocab_size, loaded.tokenizer.get_vocab()),
                              loading.eos_token_ids(loaded), self.node_ip, self.spec.max_len, self.spec.secret)
        self.verifier, self.proposer = Verifier(self.home), Proposer(self.home)
        self.drafts, self.ensemble = DraftService(self.home), EnsembleMember(self.home)
        self.members = MemberService(self.home)

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
                "eos_token_ids": list(self.home.eos_token_ids),
                "capabilities": hardware.probe(self.device).to_dict(), "threading": threads.describe(),
                **self.home.runner.runtime_info()}

    def cancel(self, session: str) -> None:
        self.home.cancelled.add(session)

    def stop(self, session: str) -> None:
        """End `session` after its current round and answer normally (a stop string was seen)."""
        self.home.stopped.add(session)

    def verify_costs(self, sizes: list[int]) -> dict[int, float]:
        """Milliseconds of one target forward of k tokens, per k: sizes a heads drafter's trees."""
        with self.home.busy:
            return {k: s * 1e3 for k, s in self.home.runner.measure_verify_costs(tuple(sizes)).items()}

    def listen(self, peer_node_ip: str) -> str:
        """Where a drafter on `peer_node_ip` should connect: ipc on this node, else tcp."""
        transport = "ipc" if peer_node_ip == self.node_ip else "tcp"
        routers = self.home.routers
        if transport not in routers:
            endpoint = bind_endpoint(self.node_ip, peer_node_ip, name=f"verifier-{os.getpid()}")
            routers[transport] = RouterChannel(endpoint, config=self.home.channel_config(endpoint, binds=True))
        return routers[transport].endpoint

    # ---- the roles (actors/actor_roles.py) -------------------------------------------
    def verify(self, session: str, endpoint: str, prompt: list[int], decode: dict, options: dict,
               drafter: list, on_tokens: TokenSink | None = None) -> dict:
        return self.verifier.verify(session, endpoint, prompt, decode, options, drafter, on_tokens)

    def verify_stream(self, session: str, endpoint: str, prompt: list[int], decode: dict, options: dict,
                      drafter: list):
        """`verify` as a Ray streaming generator: `{"token_ids": [...]}` per commit as the
        tokens land, then `verify`'s answer."""
        yield from _streamed(session, lambda sink: self.verifier.verify(session, endpoint, prompt, decode, options,
                                                                        drafter, on_tokens=sink))

    def draft(self, session: str, endpoint: str, decode: dict, options: dict) -> dict:
        return self.proposer.draft(session, endpoint, decode, options)

    def serve_drafts(self, peer_node_ip: str, slots: int, max_draft: int, verify_s: dict, mode: str = "sync") -> str:
        """`verify_s`: the target's verify seconds by tokens; `mode`: the pipeline (async,
        ssd: draft each sequence's next round while the verifier verifies)."""
        return self.drafts.serve(peer_node_ip, slots, max_draft, verify_s, mode)

    def serve_member(self, peer_node_ip: str, slots: int, max_len: int) -> str:
        """Score for a batched ensemble leader on `peer_node_ip` (CoS in actors, batched)."""
        return self.members.serve(peer_node_ip, slots, max_len)

    def ensemble_lead(self, session: str, endpoint: str, prompt: list[int], decode: dict, spec: dict,
                      followers: list, on_tokens: TokenSink | None = None) -> dict:
        return self.ensemble.lead(session, endpoint, prompt, decode, spec, followers, on_tokens)

    def ensemble_lead_stream(self, session: str, endpoint: str, prompt: list[int], decode: dict, spec: dict,
                             followers: list):
        """`ensemble_lead` as a Ray streaming generator, like `verify_stream`."""
        yield from _streamed(session, lambda sink: self.ensemble.lead(session, endpoint, prompt, decode, spec,
                                                                      followers, on_tokens=sink))

    def ensemble_follow(self, session: str, endpoint: str, decode: dict, index: int, peer: dict | None = None) -> dict:
        return self.ensemble.follow(session, endpoint, decode, index, peer)

    # ---- benchmarks ------------------------------------------------------------------
    def use_oracle(self, reference: list[int], acceptance: float, step_cost_s: float, seed: int) -> None:
        """Draft with an `actors.oracle.OracleRunner` (controlled acceptance and cost, greedy
        only) instead of the model; the fingerprint stays the loaded model's."""
        from actors.oracle import OracleRunner

        with self.home.busy:
            self.home.runner = OracleRunner(reference, self.home.runner.vocab_size, acceptance, step_cost_s, seed)


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
