"""The drafter's side of a request: propose continuations the target may accept.

sync: per round, draft a tree from the committed tokens (`ModelRunner.propose`, adaptive
length), send it, wait for the verdict.

ssd: sync's rounds, but while waiting, draft the next round for the verdict's likeliest
outcomes (`actors.ssd`); a verdict that names one gets its draft at once.

async: keep drafting one chain ahead of the committed tokens, at most `lookahead` drafts
beyond them, sending each draft as it is made (a two-node tree whose root is the token
before it, with its position and, when sampling, the distribution it was drawn from). A
verdict either confirms the speculation (the target's token equals ours at that position:
keep going) or refutes it: crop the KV cache back to the committed tokens, bump the epoch
so the verifier can tell new drafts from stale ones, and draft from the target's token.
Why that is lossless: see `actors.verifying`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from actors.pipeline_options import Cancelled, PipelineOptions
from actors.runner import ModelRunner
from actors.ssd import draft_ssd
from decoding.draft_length import DraftLengthPolicy
from decoding.request import DecodeConfig, make_generator
from decoding.sampling import logits_to_probs, sample
from protocol import (
    CandidateTree,
    ContextUpdate,
    DealerChannel,
    Error,
    Handshake,
    Message,
    ModelFingerprint,
    ProtocolError,
    ReceiveTimeout,
    Role,
    Shutdown,
    Verdict,
)


class VerifierGone(Exception):
    """The verifier stopped answering within `verdict_timeout_s`."""


class _Session:
    """The committed tokens as the verifier told us, and the wait for its next word."""

    def __init__(self, channel: DealerChannel, opts: PipelineOptions, session: str, cancelled: Callable[[], bool]):
        self.channel, self.opts, self.session, self.cancelled = channel, opts, session, cancelled
        self.prompt: list[int] = []
        self.committed: list[int] = []
        self.hidden = None  # heads: the target's state at the newest committed token's predecessor
        self.done = False

    def recv(self, block: bool) -> Message | None:
        deadline = time.perf_counter() + self.opts.verdict_timeout_s
        while True:
            if self.cancelled():
                raise Cancelled(self.session)
            try:
                message = self.channel.recv(timeout_s=self.opts.poll_s if block else 0)
            except ReceiveTimeout:
                if not block:
                    return None
                if time.perf_counter() > deadline:
                    raise VerifierGone(f"no word from the verifier for {self.opts.verdict_timeout_s:.0f} s") from None
                continue
            if isinstance(message, Error):
                raise message.to_exception()
            if isinstance(message, Shutdown):
                self.done = True
            elif isinstance(message, ContextUpdate):
                if message.is_prompt:
                    self.prompt = list(message.token_ids)
                del self.committed[message.position:]
                self.committed.extend(message.token_ids)
                if message.hidden is not None:
                    self.hidden = message.hidden
            return message

    def round_trip(self, tree: CandidateTree) -> Verdict | None:
        """sync: send a tree, wait for its verdict, commit what it accepted (None: shutdown)."""
        self.channel.send(tree)
        return self.verdict_for(tree)

    def verdict_for(self, tree: CandidateTree, received: Message | None = None) -> Verdict | None:
        """Wait for the verdict on `tree` (`received`: a message already taken off the
        socket) and commit what it accepted (None: shutdown)."""
        message = received if received is not None else self.recv(block=True)
        while not isinstance(message, (Verdict, Shutdown)):
            message = self.recv(block=True)
        if isinstance(message, Shutdown):
            return None
        self.committed.extend(tree.path_tokens(message.accepted_path))  # raises if the path is not in our tree
        self.committed.append(message.bonus_token_id)
        if message.committed_length != len(self.committed):
            raise ProtocolError(f"verdict says {message.committed_length} committed tokens, we have "
                                f"{len(self.committed)}")
        return message

    @property
    def started(self) -> bool:  # the target has produced its first token
        return len(self.committed) > len(self.prompt) > 0


def propose_request(
    runner: ModelRunner,
    channel: DealerChannel,
    fingerprint: ModelFingerprint,
    session: str,
    cfg: DecodeConfig,
    opts: PipelineOptions,
    policy: DraftLengthPolicy | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict:
    """Draft for one request until the verifier says it is done. Returns drafting stats."""
    channel.handshake(Handshake(session_id=session, step=0, role=Role.DRAFTER, fingerprint=fingerprint),
                      timeout_s=opts.handshake_timeout_s)
    s = _Session(channel, opts, session, cancelled)
    # Our own coins: the drafter's randomness must be independent of the target's.
    gen = make_generator(None if cfg.seed is None else cfg.seed + 1)
    stats = {"draft_s": 0.0, "drafted": 0, "rollbacks": 0, "rounds": 0}
    while not s.prompt and not s.done:
        s.recv(block=True)
    runner.reset(cfg.cache_room(len(s.prompt), opts.lookahead))
    if s.prompt:
        runner.feed(s.prompt)  # prefill while the target does the same
    if opts.mode == "sync":
        _draft_sync(runner, s, cfg, policy, gen, stats)
    elif opts.mode == "ssd":
        draft_ssd(runner, s, cfg, policy, gen, stats)
    else:
        _draft_async(runner, s, cfg, opts, gen, stats)
    channel.sessions.close(session)
    return stats


def _draft_sync(runner, s: _Session, cfg: DecodeConfig, policy, gen, stats: dict) -> None:
    policy = policy or DraftLengthPolicy(max_len=cfg.max_draft_length, fixed=cfg.draft_length,
                                         tokens_per_node=cfg.tree_width)
    step = 0
    while not s.done:
        if not s.started:
            s.recv(block=True)
            continue
        remaining = cfg.max_new_tokens - (len(s.committed) - len(s.prompt))
        context = list(s.committed)
        proposal = runner.propose(context, cfg.sampling, policy, max_depth=max(1, remaining - 1),
                                  width=cfg.tree_width, generator=gen)
        stats["draft_s"] += proposal.seconds
        stats["drafted"] += proposal.depth
        sent = time.perf_counter()
        tree = CandidateTree(session_id=s.session, step=step, position=len(context) - 1,
                             token_ids=proposal.tree.tokens, parents=proposal.tree.parents,
                             draft_probs=proposal.draft_probs)
        step += 1
        verdict = s.round_trip(tree)
        if verdict is not None:
            # The round trip is what a verify costs us, transport included.
            policy.costs.observe_draft(proposal.seconds, proposal.depth)
            policy.costs.observe_verify(time.perf_counter() - sent, proposal.tree.size)
            policy.observe_acceptance(len(verdict.accepted_path), proposal.predicted)
            stats["rounds"] += 1


def _draft_async(runner, s: _Session, cfg: DecodeConfig, opts: PipelineOptions, gen, stats: dict) -> None:
    spec: list[int] = []  # our drafts beyond the committed tokens, in order
    epoch = 0
    while True:
        budget = len(s.prompt) + cfg.max_new_tokens - len(s.committed) - 1
        can_draft = s.started and len(spec) < min(opts.lookahead, budget)
        message = s.recv(block=not can_draft)
        while message is not None:
            if isinstance(message, Verdict):
                epoch = _apply_verdict(s, spec, message, epoch, stats)
            message = s.recv(block=False)
        if s.done:
            return
        budget = len(s.prompt) + cfg.max_new_tokens - len(s.committed) - 1
        if not (s.started and len(spec) < min(opts.lookahead, budget)):
            continue
        start = time.perf_counter()
        context = s.committed + spec
        logits = runner.feed(runner.sync(context[:-1]) + context[-1:])
        probs = None
        if cfg.sampling.greedy:
            token = int(logits.argmax())
        else:
            q = logits_to_probs(logits, cfg.sampling)
            token = int(sample(q, gen))
            probs = torch.zeros(2, q.shape[-1])
            probs[0] = q
        spec.append(token)
        s.channel.send(CandidateTree(session_id=s.session, step=epoch, position=len(context) - 1,
                                     token_ids=(context[-1], token), parents=(-1, 0), draft_probs=probs))
        stats["draft_s"] += time.perf_counter() - start
        stats["drafted"] += 1


def _apply_verdict(s: _Session, spec: list[int], verdict: Verdict, epoch: int, stats: dict) -> int:
    """Commit what the target accepted; keep our later drafts only if they still hold."""
    accepted, token = len(verdict.accepted_path), verdict.bonus_token_id
    if tuple(verdict.accepted_path) != tuple(range(1, accepted + 1)) or accepted > len(spec):
        raise ProtocolError(f"verdict path {verdict.accepted_path} is not a prefix of our {len(spec)} drafts")
    stats["rounds"] += 1
    confirmed = len(spec) > accepted and spec[accepted] == token
    s.committed.extend(spec[:accepted] + [token])
    if len(spec) > accepted and not confirmed:
        epoch += 1  # our drafts past this point are dead; the runner crops its cache on the next draft
        stats["rollbacks"] += 1
    del spec[: accepted + 1 if confirmed else len(spec)]
    if verdict.committed_length != len(s.committed):
        raise ProtocolError(f"verdict says {verdict.committed_length} committed tokens, we have {len(s.committed)}")
    return epoch


def propose_with_heads(
    drafter,
    channel: DealerChannel,
    fingerprint: ModelFingerprint,
    session: str,
    cfg: DecodeConfig,
    opts: PipelineOptions,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict:
    """Draft heads over the wire (sync only): each verdict brings the target's hidden state
    at the last accepted node; the heads turn it into the next tree (`HeadDrafter`)."""
    channel.handshake(Handshake(session_id=session, step=0, role=Role.DRAFTER, fingerprint=fingerprint),
                      timeout_s=opts.handshake_timeout_s)
    s = _Session(channel, opts, session, cancelled)
    stats = {"draft_s": 0.0, "drafted": 0, "rollbacks": 0, "rounds": 0, "build_s": 0.0}
    step = 0
    while not s.done:
        if not s.started or s.hidden is None:
            s.recv(block=True)
            continue
        remaining = cfg.max_new_tokens - (len(s.committed) - len(s.prompt))
        proposal = drafter.propose(torch.as_tensor(s.hidden), s.committed[-1], max_depth=remaining - 1)
        s.hidden = None
        stats["draft_s"] += proposal.seconds
        stats["build_s"] += proposal.build_s
        stats["drafted"] += proposal.tree.size - 1
        tree = CandidateTree(session_id=s.session, step=step, position=len(s.committed) - 1,
                             token_ids=proposal.tree.tokens, parents=proposal.tree.parents)
        step += 1
        verdict = s.round_trip(tree)
        if verdict is not None:
            if verdict.hidden is None:
                raise ProtocolError("a verdict for draft heads must carry the target's hidden state")
            s.hidden = verdict.hidden
            drafter.observe(proposal, len(verdict.accepted_path))
            stats["rounds"] += 1
    channel.sessions.close(session)
    return stats
