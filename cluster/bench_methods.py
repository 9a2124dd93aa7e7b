"""`specray bench`'s methods: each is a `DecoderSpec` (and whether it speculates), built
from the run's flags and decoded through `make_decoder` like any other way of decoding.

Methods that load weights in this process share them (`ModelPool`): the target is loaded
once for `hf`, `ar`, `spec-local`, the heads methods and the target side of `spec-sync` /
`spec-async` (the batched engine with the draft model in a Ray actor of its own, as Serve
runs `pipeline: sync` and `async`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from cluster.spec import FLAGS, DecoderSpec
from decoding.request import GenerationResult

DRAFT = "--draft"  # in a method's fields: the run's draft model


@dataclass(frozen=True)
class Method:
    fields: dict  # DecoderSpec fields beyond the run's target, dtypes and placement
    speculative: bool = True  # False: the same decoder, target alone
    by_text: bool = False  # its output is text (llama.cpp): compared with the reference as text

    @property
    def needs_draft(self) -> bool:
        return self.fields.get("draft") == DRAFT


HEAD_METHODS = {f"{kind}-{tree}": (kind, tree) for kind in ("medusa", "amphista") for tree in ("static", "dynamic")}
PIPELINE_METHODS = ("spec-sync", "spec-async", "spec-ssd")  # the draft model in its own Ray actor
METHODS: dict[str, Method] = {
    "hf": Method({"backend": "hf"}, speculative=False),
    "hf-assisted": Method({"backend": "hf", "draft": DRAFT}),
    "ar": Method({}, speculative=False),
    "spec-local": Method({"draft": DRAFT}),
    "spec-ngram": Method({"draft": "ngram"}),  # prompt lookup: no draft model
    **{name: Method({"heads": kind, "tree": tree}) for name, (kind, tree) in HEAD_METHODS.items()},
    "spec-sync": Method({"draft": DRAFT, "pipeline": "sync"}),
    "spec-async": Method({"draft": DRAFT, "pipeline": "async"}),
    "spec-ssd": Method({"draft": DRAFT, "pipeline": "ssd"}),
    "llamacpp": Method({"backend": "llamacpp"}, speculative=False, by_text=True),
    "llamacpp-spec": Method({"backend": "llamacpp", "draft": DRAFT}, by_text=True),
}


def method_spec(name: str, args: argparse.Namespace) -> DecoderSpec:
    """The decoder `name` runs with these flags; a bad combination names the method."""
    from cluster.batching.scheduler import BatchConfig

    fields = dict(METHODS[name].fields)
    if fields.get("draft") == DRAFT:
        fields["draft"] = args.draft
    if "heads" in fields:  # --heads / --amphista-heads, else the target's built-in heads of that kind
        given = args.heads if fields["heads"] == "medusa" else getattr(args, "amphista_heads", None)
        fields["heads"] = given or fields["heads"]
    if fields.get("pipeline", "local") != "local":  # one request at a time: one cache slot each side
        fields["batch"] = BatchConfig(max_seqs=1)
    try:
        return DecoderSpec(target=args.target, dtype=args.dtype, draft_dtype=args.draft_dtype,
                           llamacpp=getattr(args, "llamacpp", None) if fields.get("backend") == "llamacpp" else None,
                           lookahead=args.lookahead, accelerator=args.accelerator, cpus_per_actor=args.cpus_per_actor,
                           spread=args.spread, names=FLAGS, **fields)
    except ValueError as e:
        raise ValueError(f"bench method {name}: {e}") from None


@dataclass
class MethodTotals:
    tokens: int = 0
    seconds: float = 0.0
    accepted_per_step: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    by_text: bool = False  # llama.cpp rows: outputs are its text encoded again
    draft_s: float = 0.0  # time spent drafting (the pipelines: the target waiting for its drafter)
    rounds: int = 0  # draft heads: verify rounds, nodes drafted and tree-build time over them
    drafted: int = 0
    build_s: float = 0.0
    verify_s: float = 0.0  # draft heads: target forwards over the trees
    wait_s: float = 0.0  # the pipelines: the verifier waiting for a draft
    hits: int = 0  # ssd: rounds answered from a pre-draft, and drafted afresh
    misses: int = 0
    per_prompt: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds), in prompt order

    def add(self, result: GenerationResult, speculative: bool) -> None:
        s = result.stats
        tokens = s.new_tokens or len(result.token_ids)
        self.tokens += tokens
        self.seconds += s.wall_s
        self.per_prompt.append((tokens, s.wall_s))
        self.outputs.append(result.token_ids)
        if speculative and s.verify_rounds:
            self.accepted_per_step.append(s.mean_accepted)
        self.draft_s += s.draft_s
        self.rounds += s.verify_rounds
        self.drafted += s.drafted_tokens
        self.build_s += s.tree_build_s
        self.verify_s += s.verify_s
        self.wait_s += s.wait_s
        self.hits += s.predraft_hits
        self.misses += s.predraft_misses
