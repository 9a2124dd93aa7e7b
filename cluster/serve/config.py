"""What `deploy/serve.yaml`'s `args:` may say. Serve validates them with this model
before the replica starts, so a typo fails `serve run` with the field named."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.loading import DEFAULT_DRAFT, DEFAULT_TARGET


class ServeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str | None = DEFAULT_TARGET
    draft: str | None = DEFAULT_DRAFT  # null: the target alone
    heads: str | None = None  # draft heads (built-in medusa or amphista, or a directory) instead of a draft
    tree: Literal["static", "dynamic"] = "dynamic"  # the heads' candidate trees
    ensemble: list[str] | None = None  # decode as one ensemble instead of target + draft
    combine: str | None = None  # ensemble rule: we:LAMBDA or cd:MU
    # local: models in the replica, requests batched continuously (cluster/batching);
    # sync: batched too, the target in the replica and the draft model or heads in their own
    # actor (cluster/batching/remote.py); async: as sync, the draft model drafting each next
    # round while the target verifies. Ensembles: local = every member in the replica,
    # batched (CoS, cluster/batching/ensemble.py); sync = one actor per member, one request
    # at a time. Default: local for a target (+ draft or heads), sync for an ensemble.
    pipeline: Literal["local", "sync", "async", "ssd"] | None = None
    served_model_name: str | None = None  # the `model` clients name; default: the target's
    dtype: str = "file"  # the target as its files store it (a GGUF file: its own blocks), resolved where it loads
    draft_dtype: str = "auto"  # resolved in each actor: bf16 where its device runs it natively
    # Long contexts (TidalDecode, actors/tidal.py): draft `self` = the target drafts for itself
    # (pipeline local); draft_attention tidal[:BUDGET] = the draft attends sparsely (exact output);
    # attention tidal[:BUDGET] = the target attends sparsely: APPROXIMATE, and answers say so.
    attention: str | None = None
    draft_attention: str | None = None
    max_len: int = Field(4096, ge=16)
    lookahead: int = Field(8, ge=1)
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    cpus_per_actor: int = Field(1, ge=1)
    spread: bool = False  # the drafter (ensembles: each other member) on a node of its own, not the replica's
    # Requests one replica holds (decoding + waiting) before it answers 503.
    max_pending: int = Field(32, ge=1)
    # Continuous batching (pipeline local): sequences decoding at once, and the KV entries
    # (prompt + max_tokens + draft room, per request) budgeted over them; the rest wait.
    max_batch: int = Field(16, ge=1)
    kv_tokens: int = Field(65536, ge=64)
    draft_length: int | None = Field(None, ge=0, le=8)  # None: chosen per round from measured costs
    # API keys: requests must carry `Authorization: Bearer KEY`. `api_key` gives the key,
    # or `api_key_env` names the environment variable holding it (kept out of the config).
    api_key: str | None = None
    api_key_env: str | None = None
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger request bodies get 413
    # Slow clients: a body must arrive within body_timeout_s (else 408), and at most
    # max_reading requests may be sending theirs at once (beyond: 503 at once), so uploads
    # that trickle cannot take every place on the replica and leave /health queued. A body
    # being read costs a coroutine, not a decoding slot: the bound is generous, so that a
    # burst of ordinary requests (all reading at once for a moment) is never refused.
    body_timeout_s: float = Field(30.0, gt=0)
    max_reading: int = Field(128, ge=1)
    max_messages: int = Field(256, ge=1)  # chat messages per request
    max_stop: int = Field(4, ge=0)  # stop strings per request
    default_max_tokens: int = Field(256, ge=1)  # when a request names no max_tokens
    request_timeout_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: an empty key is no key; give one, or leave api_key out")
        explicit_draft = "draft" in self.model_fields_set  # the default draft gives way to heads or an ensemble
        if self.ensemble is not None:
            self.target = None  # the ensemble is the target
        if (self.ensemble is not None or self.heads is not None) and not explicit_draft:
            self.draft = None
        if self.pipeline is None:
            self.pipeline = "sync" if self.ensemble is not None else "local"
        self.decoder_spec()  # every rule about which options go together (cluster.spec)
        return self

    def decoder_spec(self):
        from cluster.batching.scheduler import BatchConfig
        from cluster.spec import CONFIG_KEYS, DecoderSpec

        return DecoderSpec(self.target, self.draft, self.heads, self.tree,
                           tuple(self.ensemble) if self.ensemble else None, self.combine, self.pipeline, self.dtype,
                           self.draft_dtype, self.max_len, self.attention, self.draft_attention, self.lookahead,
                           self.accelerator, self.cpus_per_actor, self.spread, self.request_timeout_s,
                           BatchConfig(max_seqs=self.max_batch, kv_tokens=self.kv_tokens,
                                       draft_length=self.draft_length), names=CONFIG_KEYS)

    def resolved_api_key(self) -> str | None:
        if self.api_key_env is None:
            return self.api_key
        import os

        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"api_key_env names {self.api_key_env}, which is not set in the replica's environment")
        return key

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return "+".join(self.ensemble) if self.ensemble else str(self.target)
