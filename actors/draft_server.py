"""A draft model serving a batched verifier over the protocol: many sequences per process.

The verifier (`actors/drafters/remote.py`) sends one `DraftCall` per drafting sequence each
round, all with the round's step; once the server holds the round's `batch` calls it
drafts every chain in one batched draft forward per depth (`DraftModelDrafter`) and answers
each session with a `CandidateTree`. Between rounds it keeps each sequence's draft cache:
a call carries only the committed tokens the server has not seen, and the part of the
cache past what was committed (a rejected draft) is cropped away.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from actors.drafters.draft_model import DraftModelDrafter
from decoding.acceptance import Verdict
from decoding.request import DecodeConfig
from decoding.round import Draft
from decoding.sampling import SamplingParams
from decoding.sequence import Sequence
from decoding.tree import TokenTree
from protocol import (
    CandidateTree,
    ChannelConfig,
    DraftCall,
    Message,
    ModelFingerprint,
    ProtocolError,
    Role,
    RouterChannel,
    Shutdown,
    bind_endpoint,
    link_auth,
)


def draft_seed(seed: int | None) -> int | None:
    """The draft's own random stream for a seeded request. Not the request's seed itself: the
    verifier draws its acceptance tests from a stream seeded with that, and a draft sampled
    from an identical stream would be correlated with the tests that judge it (the output
    would no longer follow the target). Derived, so a seeded request still reproduces."""
    if seed is None:
        return None
    return (seed * 0x9E3779B97F4A7C15 + 0xD1B54A32D192ED03) % (2**63 - 1)


class DraftRefused(ProtocolError):
    """A call that does not fit what the server holds for its session."""


@dataclass
class _Ahead:
    """A draft made before its round: valid if the verifier commits exactly `committed`."""
    committed: list[int]  # the last answer's drafts all accepted, then the draft's guess of the bonus
    draft: Draft  # the chain from that guess, with its q rows when sampling
    alone: bool


@dataclass
class _Mirror:
    seq: Sequence  # the committed tokens as the verifier said (all in `prompt`), the draft state
    last: Draft | None = None  # what was proposed last round, to learn how much of it was kept
    root: int = 0  # the position of that draft's root
    ahead: _Ahead | None = None  # drafting ahead (`pipeline: async`): the next round's likely draft
    alone: bool = False  # the last call drafted by the draft's own per-token policy


class RoundServer:
    """Gathers a batched verifier's round: answers once all `batch` calls of a step are in.
    A subclass answers them (`answer`) and forgets a session (`release`)."""

    CALL: type[Message] = DraftCall  # the calls a round is made of

    def __init__(self):
        self.pending: dict[tuple[bytes, int], list] = {}  # (peer, step) -> the round's calls so far
        self.interrupted: Callable[[], bool] = lambda: False  # a call is waiting (set by `serve_rounds`)

    def handle(self, peer: bytes, message: Message) -> list[Message] | None:
        """`RouterChannel.serve`'s handler."""
        if isinstance(message, Shutdown):
            self.release(message.session_id)
            return None
        if not isinstance(message, self.CALL):
            raise DraftRefused(f"this server answers {self.CALL.__name__} and Shutdown, not {type(message).__name__}")
        key = (peer, message.step)
        calls = self.pending.setdefault(key, [])
        calls.append(message)
        if len(calls) < message.batch:
            return None
        del self.pending[key]
        return self.answer(calls)

    def answer(self, calls: list) -> list[Message]:
        raise NotImplementedError

    def after_replies(self) -> None:
        """Work once a round's answers are sent, while the verifier verifies them."""

    @staticmethod
    def check_position(call, known: int | None) -> None:
        """`known`: committed tokens held for the call's session (None: a new session)."""
        if known is None and call.position != 0:
            raise DraftRefused(f"session {call.session_id}: its first call must start at position 0, "
                               f"not {call.position}")
        if known is not None and call.position > known:
            raise DraftRefused(f"session {call.session_id}: tokens from position {call.position}, but only "
                               f"{known} are known")

    def release(self, session: str) -> None:
        raise NotImplementedError


def serve_rounds(server: RoundServer, node_ip: str, peer_node_ip: str, name: str, secret: str | None,
                 fingerprint: ModelFingerprint, role: Role = Role.DRAFTER) -> tuple[RouterChannel, threading.Thread]:
    """Bind a socket for a verifier on `peer_node_ip` (ipc on this node, else tcp
    authenticated by `secret`: protocol.link_auth) and answer its rounds with `server` on a thread of its own."""
    endpoint = bind_endpoint(node_ip, peer_node_ip, name=name)
    auth = link_auth(endpoint, secret, binds=True)
    router = RouterChannel(endpoint, config=ChannelConfig(tensor_lib="torch", auth=auth))
    server.interrupted = router.waiting  # work between rounds yields to the next call
    thread = threading.Thread(target=router.serve, args=(server.handle,), name=name, daemon=True,
                              kwargs=dict(role=role, fingerprint=fingerprint,
                                          after_replies=server.after_replies))
    thread.start()
    return router, thread


class DraftServer(RoundServer):
    def __init__(self, runner, slots: int, max_len: int, max_draft: int, verify_s: dict[int, float],
                 ahead: bool = False):
        """`runner`: the draft's `ModelRunner`; `verify_s`: the target's verify seconds by
        tokens (what the per-token policy of a sequence alone weighs drafting against).
        `ahead`: once a round is answered, draft each sequence's next round while the target
        verifies, betting that every draft is accepted and the bonus is the draft's own next
        token (AMUSD); the next call that commits exactly that is answered at once."""
        super().__init__()
        self.drafter = DraftModelDrafter(runner.model, slots, max_len, max_draft, sparse=runner.attention)
        self.drafter.measure(runner, verify_s)
        self.max_len, self.ahead = max_len, ahead
        self.mirrors: dict[str, _Mirror] = {}
        self.answered: list[str] = []  # the sessions of the round just answered: to draft ahead for
        self.hits = self.misses = 0  # drafts ahead used, and thrown away
        self.keep_rows = False  # ssd: drafts keep their distributions (the next outcomes' guesses)
        self.ranks: dict[str, int] = {}  # ssd: the session's answer was pre-drafted, for this outcome rank

    def answer(self, calls: list[DraftCall]) -> list[CandidateTree]:
        drafts: dict[str, Draft] = {}
        by_kind: dict[tuple[int, bool], list[Sequence]] = {}
        for call in calls:
            seq = self._sync(call)
            if (hit := self._ahead_hit(call)) is not None:
                drafts[call.session_id] = hit
            else:
                self._keep_what_was_kept(self.mirrors[call.session_id])
                by_kind.setdefault((call.depth, call.alone), []).append(seq)
        for (depth, alone), group in by_kind.items():  # alone: the draft's per-token policy stops it
            drafts.update(self.drafter.propose(group, None if alone else depth, keep_rows=self.keep_rows))
        out = []
        for call in calls:
            mirror, draft = self.mirrors[call.session_id], drafts.get(call.session_id)
            mirror.last, mirror.root = draft, call.position + len(call.token_ids) - 1
            mirror.alone = call.alone
            tokens = draft.tree.tokens.tolist() if draft is not None else [call.token_ids[-1]]
            probs = draft.q if draft is not None and draft.q is not None else None
            out.append(CandidateTree(session_id=call.session_id, step=call.step, token_ids=tokens,
                                     parents=[-1, *range(len(tokens) - 1)], draft_probs=probs,
                                     position=mirror.root, pre_drafted=self.ranks.pop(call.session_id, None)))
        self.answered = [call.session_id for call in calls if drafts.get(call.session_id) is not None]
        return out

    def _ahead_hit(self, call: DraftCall) -> Draft | None:
        """The draft made ahead for this call, if the verifier committed what it bet on."""
        mirror = self.mirrors[call.session_id]
        ahead, mirror.ahead = mirror.ahead, None
        if ahead is None:
            return None
        if ahead.committed != mirror.seq.prompt or ahead.alone != call.alone:
            self.misses += 1
            return None
        self.hits += 1
        last, st = mirror.last, mirror.seq.draft
        if last is not None and last.predicted > 0:  # the last draft was kept whole: calibrate the policy
            self.drafter.policy.observe_acceptance(last.drafted, last.predicted)
        # the cache holds the bet (its bonus guess included) and the chain after it, as a
        # fresh draft from that guess would: nothing to crop, and all of the bet is committed
        st.verified = len(ahead.committed) - 1
        depth = min(ahead.draft.drafted, call.depth, call.remaining - 1)
        q = ahead.draft.q[:depth + 1] if ahead.draft.q is not None else None
        return Draft(TokenTree.chain(ahead.draft.tree.tokens[0].item(), ahead.draft.tree.tokens[1:depth + 1]), q)

    def after_replies(self) -> None:
        """Drafting ahead: for each sequence just answered, draft the round after it (one
        batched forward per depth) while the verifier verifies. Always the same work whatever
        the timing, so a seeded request reproduces."""
        if not self.ahead:
            return
        by_kind: dict[tuple[int, bool], list[_Mirror]] = {}
        for session in self.answered:
            mirror = self.mirrors.get(session)
            if mirror is None or mirror.last is None:
                continue
            seq, k = mirror.seq, mirror.last.drafted
            room = seq.cfg.max_new_tokens - k - 1  # tokens still due once the bet comes true
            if room < 2 or len(seq.prompt) + 2 * k + 3 > self.max_len:
                continue
            by_kind.setdefault((k + 1, mirror.alone), []).append(mirror)
        self.answered = []
        for (depth, alone), group in by_kind.items():
            committed = [list(m.seq.prompt) for m in group]
            for m in group:  # the bet: every draft accepted (the bonus is the first token drafted now)
                m.seq.prompt.extend(m.last.tree.tokens[1:].tolist())
                m.seq.cfg = dataclasses.replace(m.seq.cfg, max_new_tokens=m.seq.cfg.max_new_tokens - depth + 1)
            try:
                drafts = self.drafter.propose([m.seq for m in group], None if alone else depth)
            finally:
                for m, c in zip(group, committed):
                    m.seq.prompt = c
                    m.seq.cfg = dataclasses.replace(m.seq.cfg, max_new_tokens=m.seq.cfg.max_new_tokens + depth - 1)
            for m, c in zip(group, committed):
                d = drafts.get(m.seq.id)
                if d is None or d.drafted < 2:
                    continue
                tokens = d.tree.tokens.tolist()  # [last draft, guessed bonus, the chain after it]
                bet = c + m.last.tree.tokens[1:].tolist() + [tokens[1]]
                after = Draft(TokenTree.chain(tokens[1], tokens[2:]), d.q[1:] if d.q is not None else None)
                m.ahead = _Ahead(bet, after, alone)

    def _sync(self, call: DraftCall) -> Sequence:
        """Bring the session's mirror to the committed tokens the call reports."""
        mirror = self.mirrors.get(call.session_id)
        self.check_position(call, None if mirror is None else len(mirror.seq.prompt))
        if mirror is None:
            params = SamplingParams(temperature=call.temperature, top_p=call.top_p, top_k=call.top_k)
            cfg = DecodeConfig(max_new_tokens=call.remaining, sampling=params, seed=draft_seed(call.seed))
            mirror = self.mirrors[call.session_id] = _Mirror(Sequence(call.session_id, [], cfg, True, None))
            self.drafter.start(mirror.seq, None)  # its slot goes back on the session's Shutdown
        seq = mirror.seq
        seq.prompt[call.position:] = call.token_ids
        seq.cfg = dataclasses.replace(seq.cfg, max_new_tokens=call.remaining)
        if len(seq.prompt) + call.depth + 1 > self.max_len:
            raise DraftRefused(f"session {call.session_id}: {len(seq.prompt)} tokens + depth {call.depth} exceed "
                               f"this draft server's max_len {self.max_len}")
        return seq

    def _keep_what_was_kept(self, mirror: _Mirror) -> None:
        """Crop the draft cache to what was kept of the last draft (and tell the draft's
        policy how much)."""
        kept = 0
        if mirror.last is not None:
            drafted = mirror.last.tree.tokens.tolist()[1:]
            committed = mirror.seq.prompt[mirror.root + 1:]
            while kept < min(len(drafted), len(committed)) and drafted[kept] == committed[kept]:
                kept += 1
        self.drafter.observe(mirror.seq, mirror.last, Verdict(list(range(1, kept + 1)), 0), None)

    def release(self, session: str) -> None:
        mirror = self.mirrors.pop(session, None)
        if mirror is not None:
            self.drafter.release(mirror.seq)
