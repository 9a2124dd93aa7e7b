"""What `deploy/serve.yaml`'s `args:` may say. Serve validates them with this model
before the replica starts, so a typo fails `serve run` with the field named."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.hardware import check_dtype_name
from actors.loading import DEFAULT_DRAFT, DEFAULT_TARGET


class ServeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str | None = DEFAULT_TARGET
    draft: str | None = DEFAULT_DRAFT  # null: the target alone
    heads: str | None = None  # draft heads (built-in medusa or amphista, or a directory) instead of a draft
    tree: Literal["static", "dynamic"] = "dynamic"  # the heads' candidate trees
    ensemble: list[str] | None = None  # decode as one ensemble instead of target + draft
    combine: str | None = None  # ensemble rule: we:LAMBDA or cd:MU
    # local: models in the replica; sync/async: one actor per model. Default: async for a
    # target + draft, sync for an ensemble (CoS rounds are synchronous).
    pipeline: Literal["local", "sync", "async"] | None = None
    served_model_name: str | None = None  # the `model` clients name; default: the target's
    dtype: str = "float32"
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
    spread: bool = False
    # Requests one replica holds (decoding + waiting) before it answers 503.
    max_pending: int = Field(32, ge=1)
    default_max_tokens: int = Field(256, ge=1)  # when a request names no max_tokens
    request_timeout_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        for name in ("dtype", "draft_dtype"):
            check_dtype_name(getattr(self, name), name)
        from cluster.engine import SELF, check_draft_options

        if self.ensemble is not None and (self.attention or self.draft_attention):
            raise ValueError("attention and draft_attention apply to a target and its draft, not to an ensemble")
        if self.ensemble is None:
            check_draft_options(self.draft, self.heads, self.attention, self.draft_attention, self.target)
        if self.draft == SELF and self.pipeline != "local":
            raise ValueError("draft: self runs with pipeline: local (the target drafts over its own KV cache)")
        if self.ensemble is not None:
            if len(self.ensemble) < 2:
                raise ValueError(f"ensemble needs at least 2 models, got {self.ensemble}")
            if self.combine is None:
                raise ValueError("ensemble needs combine (we:LAMBDA or cd:MU)")
            from decoding.ensemble import parse_combine

            parse_combine(self.combine, len(self.ensemble))  # names what is wrong
            self.target = self.draft = None  # the ensemble is the target
        elif self.combine is not None:
            raise ValueError("combine applies to an ensemble; set ensemble too")
        elif self.target is None:
            raise ValueError("name a target (or an ensemble)")
        if self.heads is not None:
            if self.ensemble is not None:
                raise ValueError("heads draft for a target; an ensemble's members draft for each other")
            if "draft" in self.model_fields_set and self.draft is not None:
                raise ValueError("heads and draft are two ways to draft; give one")
            self.draft = None
            if self.pipeline == "async":
                raise ValueError("heads run with pipeline local (in the replica) or sync (their own actor)")
        if self.pipeline is None:
            self.pipeline = "sync" if self.ensemble is not None or self.heads is not None else "async"
        if self.ensemble is not None and self.pipeline == "async":
            raise ValueError("ensembles run with pipeline local (in the replica) or sync (one actor per member)")
        if self.pipeline in ("sync", "async") and self.ensemble is None and self.draft is None and self.heads is None:
            raise ValueError(f"pipeline {self.pipeline} needs a draft; use pipeline local for the target alone")
        return self

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return "+".join(self.ensemble) if self.ensemble else str(self.target)
