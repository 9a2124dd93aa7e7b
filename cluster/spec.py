"""What to decode with: one `DecoderSpec`, and every rule about which options go together.

The CLI (`generate`, `bench`), the Serve app and the job entry all describe a way of
decoding as a `DecoderSpec`; building one checks it, before any weights load, with one
error per bad combination. Each front end names its options its own way (`--draft-attention`
on the command line, `draft_attention` in a Serve config), so the rules take an
`OptionNames` and every message speaks the caller's language.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors import loading
from actors.hardware import check_dtype_name
from actors.head_drafter import TREES
from actors.tidal import check_spec

SELF = "self"  # `--draft self`: the target drafts for itself with sparse attention
NGRAM = "ngram"  # `--draft ngram`: prompt lookup, drafts copied from earlier tokens (no model)
MODEL_FREE_DRAFTS = (SELF, NGRAM)  # `--draft` values that name no model
PIPELINES = ("local", "sync", "async", "ssd")
# Who decodes: our engine, or a peer on the same model (the bench's baselines):
# transformers' `generate` (with the draft as assistant model) or llama.cpp's binaries.
BACKENDS = ("specray", "hf", "llamacpp")


@dataclass(frozen=True)
class OptionNames:
    """How a front end spells an option (`draft_attention`) and an option with a value."""
    flags: bool = True  # the command line: --draft-attention; else Serve's config keys

    def __call__(self, name: str) -> str:
        return "--" + name.replace("_", "-") if self.flags else name

    def value(self, name: str, value: str) -> str:
        return f"{self(name)} {value}" if self.flags else f"{name}: {value}"


FLAGS, CONFIG_KEYS = OptionNames(True), OptionNames(False)


def check_long_context(draft: str | None, heads: str | None, attention: str | None, draft_attention: str | None,
                       target: str | None = None, names: OptionNames = FLAGS) -> None:
    """Sparse attention (TidalDecode) on the target or on the drafting side."""
    n = names
    check_spec(attention)
    check_spec(draft_attention)
    self_spec = draft_attention or "tidal"  # --draft self drafts sparsely
    for option, spec, model in (("attention", attention, target),
                                ("draft_attention", self_spec if draft == SELF else draft_attention,
                                 target if draft == SELF else draft)):
        if spec is not None and model is not None and model not in MODEL_FREE_DRAFTS \
                and loading.linear_dir(model) is not None:
            raise ValueError(f"{n.value(option, spec)}: {model!r} is a linearized model; its linear layers already "
                             "read a state of fixed size, so sparse attention does not apply")
    if draft == NGRAM and draft_attention is not None:
        raise ValueError(f"{n.value('draft', NGRAM)} copies its drafts from earlier tokens, with no model to attend: "
                         f"{n('draft_attention')} does not apply")
    if draft_attention is not None and draft is None:
        raise ValueError(f"{n('draft_attention')} sets how a draft attends: give {n.value('draft', 'D')} (a draft "
                         f"model) or {n.value('draft', SELF)} (the target drafts for itself)")
    if draft == SELF and attention is not None:
        raise ValueError(f"{n.value('draft', SELF)} drafts with sparse attention and verifies with full attention; "
                         f"{n.value('attention', 'tidal')} would make the verify approximate: give one of them")


def check_drafting(draft: str | None, heads: str | None, pipeline: str, names: OptionNames = FLAGS) -> None:
    """Who drafts, and where: a draft model, heads or the target itself, in which pipeline."""
    n = names
    if heads is not None and draft is not None:
        raise ValueError(f"{n('heads')} and {n.value('draft', draft)} are two ways to draft; give one")
    if heads is not None and pipeline in ("async", "ssd"):
        raise ValueError(f"{n('heads')} run with {n.value('pipeline', 'local')} (heads in the target's process) "
                         "or sync (heads in their own actor): each tree needs the hidden state of the previous verify")
    if draft == NGRAM and pipeline != "local":
        raise ValueError(f"{n.value('draft', NGRAM)} runs with {n.value('pipeline', 'local')}: a lookup in the "
                         "tokens costs microseconds, far less than sending them to a drafter actor")
    if draft == SELF and pipeline != "local":
        raise ValueError(f"{n.value('draft', SELF)} runs with {n.value('pipeline', 'local')}: the target drafts "
                         "over its own KV cache, and a drafter actor would need a second copy of the target")
    if pipeline != "local" and draft is None and heads is None:
        raise ValueError(f"{n.value('pipeline', pipeline)} needs {n('draft')} (the drafter actor's model) or "
                         f"{n('heads')}; use {n.value('pipeline', 'local')} for the target alone")


def check_ensemble(spec: DecoderSpec, names: OptionNames) -> None:
    """An ensemble is the target: its members draft for each other (CoS)."""
    from decoding.ensemble import parse_combine

    n = names
    if len(spec.ensemble) < 2:
        raise ValueError(f"{n('ensemble')} needs at least 2 models, got {len(spec.ensemble)}")
    if spec.combine is None:
        raise ValueError(f"{n('ensemble')} needs {n('combine')}: we:LAMBDA, we:W1,W2,... (one weight per model) "
                         "or cd:MU")
    parse_combine(spec.combine, len(spec.ensemble))  # names what is wrong with the rule
    if spec.draft is not None:
        raise ValueError(f"{n('draft')} does not apply to {n('ensemble')}: the members draft for each other (CoS); "
                         f"for a draft/target pair give {n('target')} and {n('draft')}")
    if spec.heads is not None:
        raise ValueError(f"{n('heads')} draft for a target; an ensemble's members draft for each other")
    if spec.attention or spec.draft_attention:
        raise ValueError(f"{n('attention')} and {n('draft_attention')} apply to a target and its draft, "
                         f"not to an ensemble ({n('ensemble')})")
    if spec.pipeline in ("async", "ssd"):
        raise ValueError(f"ensembles run {n.value('pipeline', 'local')} (one process) or sync (one Ray actor per "
                         "member); CoS rounds are synchronous, there is no async variant")


def check_backend(spec: DecoderSpec, names: OptionNames) -> None:
    """A peer decodes the target (and draft) the way it always does, in this process."""
    from actors.hardware import QUANTIZED

    n, backend = names, spec.backend
    if backend not in BACKENDS:
        raise ValueError(f"{n('backend')} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "specray":
        if spec.llamacpp is not None:
            raise ValueError(f"{n('llamacpp')} names llama.cpp's binaries, for {n.value('backend', 'llamacpp')}")
        return
    ours = [n(o) for o in ("heads", "attention", "draft_attention") if getattr(spec, o) is not None]
    if spec.pipeline != "local":
        ours.append(n.value("pipeline", spec.pipeline))
    if spec.draft in MODEL_FREE_DRAFTS:
        ours.append(n.value("draft", spec.draft))
    if ours:
        raise ValueError(f"{n.value('backend', backend)} decodes the target alone or with a draft model, in this "
                         f"process; {', '.join(ours)} is ours only")
    if loading.linear_dir(spec.target) is not None:
        raise ValueError(f"{n.value('backend', backend)} would run {spec.target!r}'s softmax base, not the "
                         "linearized model")
    if backend == "hf":
        if spec.dtype in QUANTIZED:
            raise ValueError(f"{n.value('backend', 'hf')} runs transformers on a dense target; "
                             f"{n.value('dtype', spec.dtype)} is ours only (compare llama.cpp on GGUF files)")
        return
    from cluster.bench_llamacpp import find_binaries

    find_binaries(spec.llamacpp, ["llamacpp-spec" if spec.draft else "llamacpp"])
    for option in ("target", "draft"):
        name = getattr(spec, option)
        if name is not None and loading.gguf_file(name) is None:
            raise ValueError(f"{n.value('backend', 'llamacpp')} reads GGUF files: {n.value(option, name)} has none "
                             "(the built-ins have them)")


@dataclass
class DecoderSpec:
    """A way of decoding, as the CLI flags or the Serve args name it; checked when built."""
    target: str | None = None
    draft: str | None = None
    heads: str | None = None
    tree: str = "dynamic"
    ensemble: tuple[str, ...] | None = None
    combine: str | None = None
    pipeline: str = "local"
    dtype: str = "float32"
    draft_dtype: str = "auto"
    max_len: int | None = None
    attention: str | None = None
    draft_attention: str | None = None
    lookahead: int = 8
    accelerator: str = "auto"
    cpus_per_actor: int = 1
    spread: bool = False
    request_timeout_s: float = 1800.0
    batch: object | None = None  # a BatchConfig: batch requests where the way of decoding allows
    backend: str = "specray"  # or a peer, for comparison (BACKENDS)
    llamacpp: str | None = None  # llama.cpp's bin folder (`backend: llamacpp`; else $SPECRAY_LLAMACPP_BIN)
    names: OptionNames = field(default=FLAGS, repr=False, compare=False)  # how errors name the options

    def __post_init__(self) -> None:
        n = self.names
        if self.pipeline not in PIPELINES:
            raise ValueError(f"{n('pipeline')} must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}")
        for option in ("dtype", "draft_dtype"):
            check_dtype_name(getattr(self, option), n(option))
        if self.tree not in TREES:
            raise ValueError(f"{n('tree')} must be one of {', '.join(TREES)}, got {self.tree!r}")
        for option, low in (("lookahead", 1), ("cpus_per_actor", 1), ("max_len", 2)):
            value = getattr(self, option)
            if value is not None and value < low:
                raise ValueError(f"{n(option)} must be >= {low}, got {value}")
        if self.ensemble is not None:
            if self.backend != "specray":
                raise ValueError(f"{n.value('backend', self.backend)} decodes one target; ensembles are ours only")
            self.ensemble = tuple(self.ensemble)
            check_ensemble(self, n)
            return
        if self.combine is not None:
            raise ValueError(f"{n('combine')} applies to an ensemble; give the members with {n('ensemble')} A,B[,C]")
        if self.target is None:
            raise ValueError(f"name a {n('target')} (or an {n('ensemble')})")
        check_drafting(self.draft, self.heads, self.pipeline, n)
        check_long_context(self.draft, self.heads, self.attention, self.draft_attention, self.target, n)
        check_backend(self, n)

    @property
    def kind(self) -> str:
        """Which builder makes its decoder (`cluster.factory.BUILDERS`)."""
        if self.ensemble is not None:
            return "ensemble"
        if self.backend != "specray":
            return self.backend
        if self.pipeline == "local":
            return "local"
        # batched, the draft model or heads in an actor of their own, async: drafting ahead
        drafter = self.draft is not None or self.heads is not None
        if self.pipeline in ("sync", "async", "ssd") and self.batch is not None and drafter:
            return "remote-drafter"
        return "ray-pipeline"
