"""A Ray actor holding only draft heads: the drafter of the sync pipeline with `--heads`.

It never loads the target: the heads' hot rows of the target's output projection are
read from the target's weight files, and each tree is drafted from the hidden state the
verifier sends with its verdict (protocol 3). Same Ray surface as `ModelActor` where the
pipeline touches a drafter: `ping`, `info`, `cancel`, `draft`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

from actors import hardware, loading
from actors.head_drafter import HeadDrafter
from actors.head_kinds import load_heads
from actors.pipeline_options import Cancelled, PipelineOptions
from actors.proposing import propose_with_heads
from decoding.request import DecodeConfig
from protocol import ChannelConfig, DealerChannel, link_auth, model_fingerprint


@dataclass(frozen=True)
class HeadsSpec:
    target: str  # the model the heads draft for: its tokenizer (fingerprint) and output rows
    heads_dir: str
    tree: str = "dynamic"
    verify_ms: dict = field(default_factory=dict)  # the verifier's measured cost per tree size
    secret: str | None = None


class HeadsActor:
    def __init__(self, spec: dict):
        import ray

        from actors.resources import assigned_cpus

        self.spec = HeadsSpec(**spec)
        self.threads = assigned_cpus()
        torch.set_num_threads(self.threads)
        tokenizer = loading.load_tokenizer(self.spec.target)
        weights = loading.ensure_converted(self.spec.target, progress=False) if self.spec.target in loading.BUILTINS \
            else loading.resolve(self.spec.target)
        heads = load_heads(self.spec.heads_dir, weights)
        costs = {int(k): v / 1e3 for k, v in self.spec.verify_ms.items()}
        self.drafter = HeadDrafter(heads, self.spec.tree, verify_s=costs)
        self.fingerprint = model_fingerprint(heads.cfg.vocab_size, tokenizer.get_vocab())
        self.node_ip = ray.util.get_node_ip_address()
        self._busy = threading.Lock()
        self._cancelled: set[str] = set()
        self._served: list = []  # heads servers (serve_heads): (router, thread)

    def ping(self) -> bool:
        return True

    def watch(self) -> None:
        """Never returns: a caller holding this call's reference learns the moment this
        actor's process is gone (the reference resolves with an error)."""
        threading.Event().wait()

    def info(self) -> dict:
        heads = self.drafter.heads
        return {"pid": os.getpid(), "node_ip": self.node_ip, "device": "cpu", "threads": self.threads,
                "model": f"{heads.cfg.kind} heads for {heads.cfg.target} ({self.spec.tree} tree)", "dtype": "float32",
                "kernels": {}, "capabilities": hardware.probe("cpu").to_dict(), "threading": {},
                "tree": self.spec.tree}

    def serve_heads(self, peer_node_ip: str) -> dict:
        """Draft for a batched verifier on `peer_node_ip` from now on: many sequences, one
        heads tree per call (`actors/heads_server.py`), on a thread of its own. Returns where
        to connect and what sizes its trees (`n_heads`, `max_nodes`)."""
        from actors.draft_server import serve_rounds
        from actors.heads_server import HeadsServer

        router, thread = serve_rounds(HeadsServer(self.drafter), self.node_ip, peer_node_ip,
                                      f"heads-{os.getpid()}-{len(self._served)}", self.spec.secret, self.fingerprint)
        self._served.append((router, thread))
        return {"endpoint": router.endpoint, "n_heads": self.drafter.heads.n_heads,
                "max_nodes": self.drafter.max_nodes}

    def cancel(self, session: str) -> None:
        self._cancelled.add(session)

    def draft(self, session: str, endpoint: str, decode: dict, options: dict) -> dict:
        cfg, opts = DecodeConfig.from_dict(decode), PipelineOptions(**options)
        auth = link_auth(endpoint, self.spec.secret, binds=False)
        with self._busy:
            try:
                with DealerChannel(endpoint, config=ChannelConfig(tensor_lib="torch", auth=auth)) as channel:
                    return propose_with_heads(self.drafter, channel, self.fingerprint, session, cfg, opts,
                                              cancelled=lambda: session in self._cancelled)
            except Cancelled:
                return {"cancelled": True}
            finally:
                self._cancelled.discard(session)
