"""Tests for decoding.draft_stream.DraftStream, the verifier's copy of an async drafter's speculation.

The async drafter (actors/proposing.py, `_draft_async`) streams two-node pieces: the root at
`position` (the token just before the draft), then one draft, with `draft_probs` row 0 the
distribution that draft was drawn from; every piece is tagged with the drafter's epoch, which it
bumps in `_apply_verdict` whenever a verdict kills the rest of its speculation. The verifier
(actors/verifying.py) absorbs pieces in arrival order and calls `advance` after each verdict.
"""

from __future__ import annotations

import copy
from collections import deque
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.draft_stream import DraftStream

COMMITTED = [5, 6, 7]  # positions 0, 1, 2


def probs(position: int, token: int, epoch: int = 0) -> torch.Tensor:
    """A two-node piece's draft_probs, as the drafter builds it: row 0 is the draft's q (here a
    tag naming the draft), row 1 is never used."""
    p = torch.full((2, 3), -1.0)
    p[0] = torch.tensor([position, token, epoch], dtype=torch.float)
    return p


def tag(position: int, token: int, epoch: int = 0) -> list[float]:
    return [float(position), float(token), float(epoch)]


def piece(stream: DraftStream, committed, epoch: int, position: int, root: int, draft: int, with_probs=True) -> int:
    """Absorb the two-node piece (root at `position`, draft at `position + 1`)."""
    p = probs(position + 1, draft, epoch) if with_probs else None
    return stream.absorb(committed, epoch, position, (root, draft), p)


def filled(drafts=(10, 11, 12), committed=COMMITTED, epoch: int = 0) -> DraftStream:
    """A stream holding `drafts` after `committed`, streamed one piece at a time."""
    stream = DraftStream()
    context = list(committed)
    for token in drafts:
        assert piece(stream, committed, epoch, len(context) - 1, context[-1], token) == 1
        context.append(token)
    return stream


def rows(stream: DraftStream) -> list:
    return [None if r is None else r.tolist() for r in stream.q_rows]


# --- pieces that extend the sequence ----------------------------------------------------------


def test_extending_pieces_are_appended_in_order_with_their_q_rows():
    stream = DraftStream()
    assert len(stream) == 0
    assert piece(stream, COMMITTED, 0, 2, 7, 10) == 1  # root is the last committed token
    assert piece(stream, COMMITTED, 0, 3, 10, 11) == 1  # root is a draft already held
    assert piece(stream, COMMITTED, 0, 4, 11, 12) == 1
    assert len(stream) == 3
    assert stream.tokens == [10, 11, 12]
    # row 0 of each piece's draft_probs, in the same order as the tokens (row 1 never leaks in)
    assert rows(stream) == [tag(3, 10), tag(4, 11), tag(5, 12)]
    assert stream.epoch == 0


def test_take_returns_a_prefix_without_consuming():
    stream = filled((10, 11, 12))
    tokens, q = stream.take(2)
    assert tokens == [10, 11]
    assert [r.tolist() for r in q] == [tag(3, 10), tag(4, 11)]
    tokens, q = stream.take(10)  # more than held: everything
    assert tokens == [10, 11, 12]
    assert [r.tolist() for r in q] == [tag(3, 10), tag(4, 11), tag(5, 12)]
    assert stream.take(0) == ([], [])
    assert stream.tokens == [10, 11, 12] and len(stream.q_rows) == 3  # take holds on to them


def test_pieces_without_probs_keep_none_rows_aligned():
    stream = DraftStream()
    assert piece(stream, COMMITTED, 0, 2, 7, 10, with_probs=False) == 1
    assert piece(stream, COMMITTED, 0, 3, 10, 11) == 1
    assert stream.take(2)[0] == [10, 11]
    assert rows(stream) == [None, tag(4, 11)]


def test_longer_piece_overlapping_known_tokens_adds_only_its_fresh_tail():
    stream = filled((10,))
    # root 6 at position 1 (committed), then 7 (committed), 10 (held), 11 and 12 fresh
    p = torch.arange(4 * 3, dtype=torch.float).reshape(4, 3)
    assert stream.absorb(COMMITTED, 0, 1, (6, 7, 10, 11, 12), p) == 2
    assert stream.tokens == [10, 11, 12]
    # node i is drawn from row i - 1: 11 is node 3, 12 is node 4
    assert rows(stream)[1:] == [p[2].tolist(), p[3].tolist()]


# --- pieces that are dropped --------------------------------------------------------------------


def test_piece_whose_root_contradicts_committed_is_dropped():
    stream = DraftStream()
    # a stale branch: the drafter's token at position 2 was 8, the target committed 7
    assert piece(stream, COMMITTED, 0, 2, 8, 10) == 0
    assert stream.tokens == [] and stream.q_rows == []


def test_piece_whose_draft_contradicts_committed_is_dropped():
    stream = DraftStream()
    assert piece(stream, COMMITTED, 0, 1, 6, 9) == 0  # position 2 is committed 7, not 9
    assert len(stream) == 0


def test_piece_contradicting_held_drafts_is_dropped_entirely():
    stream = filled((10, 11))
    assert piece(stream, COMMITTED, 0, 2, 7, 99) == 0  # position 3 holds 10
    assert piece(stream, COMMITTED, 0, 3, 99, 12) == 0  # root at position 3 holds 10
    # agrees at 2 and 3, contradicts at 4, and would have a fresh token at 5: nothing of it is used
    p = torch.zeros(4, 3)
    assert stream.absorb(COMMITTED, 0, 2, (7, 10, 98, 50), p) == 0
    assert stream.tokens == [10, 11]
    assert rows(stream) == [tag(3, 10), tag(4, 11)]


def test_piece_with_a_gap_is_dropped_and_not_kept_for_later():
    stream = DraftStream()
    assert piece(stream, COMMITTED, 0, 3, 10, 11) == 0  # root position 3 is not known yet
    assert piece(stream, COMMITTED, 0, 4, 11, 12) == 0
    assert len(stream) == 0
    assert piece(stream, COMMITTED, 0, 2, 7, 10) == 1
    assert stream.tokens == [10]  # the earlier pieces were not buffered
    assert piece(stream, COMMITTED, 0, 4, 11, 12) == 0  # still a gap: position 4 is unknown
    assert stream.tokens == [10]
    assert rows(stream) == [tag(3, 10)]


def test_piece_inside_the_known_sequence_adds_nothing():
    committed = [5, 6, 7, 8]
    stream = DraftStream()
    assert piece(stream, committed, 0, 1, 6, 7) == 0  # inside the committed tokens
    assert piece(stream, committed, 0, 2, 7, 8) == 0
    assert len(stream) == 0
    assert piece(stream, committed, 0, 3, 8, 10) == 1
    assert piece(stream, committed, 0, 4, 10, 11) == 1
    assert piece(stream, committed, 0, 3, 8, 10) == 0  # a repeat, inside committed + held
    assert piece(stream, committed, 0, 4, 10, 11) == 0
    assert stream.tokens == [10, 11]
    assert rows(stream) == [tag(4, 10), tag(5, 11)]


# --- epochs -------------------------------------------------------------------------------------


def test_lower_epoch_is_ignored():
    stream = DraftStream()
    assert piece(stream, COMMITTED, 2, 2, 7, 10) == 1
    assert stream.epoch == 2
    # would extend the sequence and agrees with everything, but is from an abandoned epoch
    assert piece(stream, COMMITTED, 1, 3, 10, 11) == 0
    assert piece(stream, COMMITTED, 0, 3, 10, 11) == 0
    assert stream.tokens == [10] and stream.epoch == 2
    assert piece(stream, COMMITTED, 2, 3, 10, 11) == 1
    assert stream.tokens == [10, 11]


def test_higher_epoch_clears_then_absorbs():
    stream = filled((10, 11, 12), epoch=0)
    assert piece(stream, COMMITTED, 1, 2, 7, 20) == 1  # contradicts held 10, but it is newer
    assert stream.epoch == 1
    assert stream.tokens == [20]
    assert rows(stream) == [tag(3, 20, 1)]
    assert piece(stream, COMMITTED, 1, 3, 20, 21) == 1
    assert piece(stream, COMMITTED, 0, 4, 21, 22) == 0  # the old epoch stays dead
    assert stream.tokens == [20, 21]


def test_higher_epoch_clears_even_when_its_piece_is_unusable():
    stream = filled((10, 11), epoch=0)
    assert piece(stream, COMMITTED, 1, 5, 30, 31) == 0  # a gap
    assert stream.epoch == 1 and len(stream) == 0 and stream.q_rows == []
    assert piece(stream, COMMITTED, 0, 2, 7, 10) == 0  # epoch 0 no longer counts
    assert len(stream) == 0


# --- advance ------------------------------------------------------------------------------------


def test_advance_keeps_later_drafts_when_the_next_token_matches():
    stream = filled((10, 11, 12, 13))
    stream.advance(1, 11)  # accepted 10; the target's next token is our draft 11
    assert stream.tokens == [12, 13]
    assert rows(stream) == [tag(5, 12), tag(6, 13)]
    stream.advance(0, 12)  # accepted nothing, but the target produced our next draft anyway
    assert stream.tokens == [13]
    assert rows(stream) == [tag(6, 13)]
    assert stream.epoch == 0


def test_advance_clears_when_the_next_token_differs():
    stream = filled((10, 11, 12, 13))
    stream.advance(1, 99)
    assert len(stream) == 0 and stream.q_rows == []
    stream = filled((10, 11, 12, 13))
    stream.advance(0, 11)  # 11 is a held draft, but not the one at position `accepted`
    assert len(stream) == 0 and stream.q_rows == []


def test_advance_when_holding_exactly_accepted_tokens_clears():
    stream = filled((10, 11))
    stream.advance(2, 10)  # nothing held at index 2, whatever the token is
    assert len(stream) == 0 and stream.q_rows == []
    stream = filled((10, 11))
    stream.advance(2, 12)
    assert len(stream) == 0 and stream.q_rows == []


def test_advance_when_holding_accepted_plus_one_matching_leaves_nothing():
    stream = filled((10, 11, 12))
    stream.advance(2, 12)
    assert len(stream) == 0 and stream.q_rows == []


def test_after_advance_the_drafters_in_flight_pieces_resume_the_stream():
    # the verifier held [10, 11], verified both, and the target's next token is 12
    stream = filled((10, 11))
    stream.advance(2, 12)
    committed = COMMITTED + [10, 11, 12]
    # the drafter had already drafted 12 and 13 (same epoch: it will confirm 12 and keep 13)
    assert piece(stream, committed, 0, 4, 11, 12) == 0  # inside committed now
    assert piece(stream, committed, 0, 5, 12, 13) == 1
    assert stream.tokens == [13] and rows(stream) == [tag(6, 13)]


def test_after_a_rejection_stale_pieces_of_the_old_epoch_are_dropped():
    # held [10, 11]; the target rejects 11 and commits 20 instead
    stream = filled((10, 11))
    stream.advance(1, 20)
    committed = COMMITTED + [10, 20]
    # still in flight from the dead branch, same epoch: 11 at position 4, then 12, 13 beyond it
    assert piece(stream, committed, 0, 3, 10, 11) == 0  # contradicts committed 20
    assert piece(stream, committed, 0, 4, 11, 12) == 0
    assert piece(stream, committed, 0, 5, 12, 13) == 0  # a gap
    assert len(stream) == 0
    # the drafter has seen the verdict, bumped its epoch, and drafts after 20
    assert piece(stream, committed, 1, 4, 20, 21) == 1
    assert stream.tokens == [21] and stream.epoch == 1


# --- the drafter's side, and a property test of the whole exchange ------------------------------


class Drafter:
    """The async drafter's bookkeeping, with the rule of actors.proposing._apply_verdict."""

    def __init__(self, prompt):
        self.committed = list(prompt)
        self.spec: list[int] = []
        self.epoch = 0

    def apply_verdict(self, accepted: int, token: int) -> None:
        assert accepted <= len(self.spec), "the verifier accepted drafts we never made (ProtocolError)"
        confirmed = len(self.spec) > accepted and self.spec[accepted] == token
        self.committed.extend(self.spec[:accepted] + [token])
        if len(self.spec) > accepted and not confirmed:
            self.epoch += 1
        del self.spec[: accepted + 1 if confirmed else len(self.spec)]

    def draft(self, token: int):
        """Draft `token` next; the piece it streams, as (epoch, position, token_ids, draft_probs)."""
        context = self.committed + self.spec
        self.spec.append(token)
        return self.epoch, len(context) - 1, (context[-1], token), probs(len(context), token, self.epoch)


@pytest.mark.parametrize(
    "spec, accepted, token",
    [([], 0, 4), ([1], 0, 1), ([1], 0, 2), ([1], 1, 3), ([1, 2, 3], 1, 2), ([1, 2, 3], 1, 9), ([1, 2, 3], 3, 9)],
)
def test_drafter_model_matches_apply_verdict(spec, accepted, token):
    from actors.proposing import _apply_verdict
    from protocol import Verdict

    prompt = [7, 8]
    session = SimpleNamespace(committed=list(prompt))
    real_spec = list(spec)
    verdict = Verdict(session_id="s", step=1, accepted_path=tuple(range(1, accepted + 1)), bonus_token_id=token,
                      committed_length=len(prompt) + accepted + 1)
    epoch = _apply_verdict(session, real_spec, verdict, 3, {"rounds": 0, "rollbacks": 0})

    model = Drafter(prompt)
    model.spec, model.epoch = list(spec), 3
    model.apply_verdict(accepted, token)
    assert (session.committed, real_spec, epoch) == (model.committed, model.spec, model.epoch)


VOCAB = 3  # tiny, so that stale branches often agree with the truth by chance


def check_stream(stream: DraftStream, committed: list[int], drafter: Drafter, verdicts) -> None:
    n = len(committed)
    # the drafter as it will be once it has read every verdict already sent
    caught_up = copy.deepcopy(drafter)
    for accepted, token in verdicts:
        caught_up.apply_verdict(accepted, token)
    assert caught_up.committed == committed

    assert stream.epoch <= drafter.epoch
    assert len(stream.q_rows) == len(stream.tokens)
    if stream.epoch == drafter.epoch and len(stream):
        # against the drafter as it is now (it may not have read the latest verdicts yet): the
        # verifier's committed tokens and then the stream are a prefix of what it has drafted
        known = drafter.committed + drafter.spec
        assert known[: n + len(stream)] == committed + stream.tokens
    if stream.epoch == caught_up.epoch:
        assert stream.tokens == caught_up.spec[: len(stream)]
        assert rows(stream) == [tag(n + i, t, stream.epoch) for i, t in enumerate(stream.tokens)]
    else:
        # a verdict has killed the stream's epoch: nothing from it may be held
        assert len(stream) == 0


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_stream_is_always_the_drafters_current_speculation(data):
    draw = data.draw
    prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3), label="prompt")
    lookahead = draw(st.integers(1, 5), label="lookahead")
    greedy = draw(st.booleans(), label="greedy")
    truth: dict[int, int] = {}  # the target's greedy token at each position

    def true_token(pos: int) -> int:
        if pos not in truth:
            truth[pos] = draw(st.integers(0, VOCAB - 1))
        return truth[pos]

    drafter = Drafter(prompt)
    committed = list(prompt)
    stream = DraftStream()
    to_verifier: deque = deque()  # pieces in flight, in order (one ZeroMQ connection)
    to_drafter: deque = deque()  # verdicts in flight, in order

    def verify() -> None:
        k = draw(st.integers(1, min(len(stream), lookahead)), label="k")
        tokens, q_rows = stream.take(k)
        assert [r.tolist() for r in q_rows] == [tag(len(committed) + i, t, stream.epoch) for i, t in enumerate(tokens)]
        if greedy:
            accepted = 0
            while accepted < k and tokens[accepted] == true_token(len(committed) + accepted):
                accepted += 1
            token = true_token(len(committed) + accepted)
        else:  # sampling: any prefix and any next token (even the rejected draft: both sides
            # then treat it as confirmed, which is still consistent)
            accepted = draw(st.integers(0, k), label="accepted")
            token = draw(st.integers(0, VOCAB - 1), label="token")
        committed.extend(tokens[:accepted] + [token])
        stream.advance(accepted, token)
        to_drafter.append((accepted, token))

    def draft() -> None:
        pos = len(drafter.committed) + len(drafter.spec)
        token = true_token(pos) if draw(st.booleans()) else draw(st.integers(0, VOCAB - 1))
        to_verifier.append(drafter.draft(token))

    def deliver() -> None:
        epoch, position, token_ids, p = to_verifier.popleft()
        stream.absorb(committed, epoch, position, token_ids, p)

    for _ in range(draw(st.integers(1, 80), label="steps")):
        actions = []
        if to_drafter:
            actions.append("read_verdict")
        if len(drafter.spec) < lookahead:
            actions.append("draft")
        if to_verifier:
            actions.append("deliver")
        if len(stream):  # the verifier waits while it has nothing
            actions.append("verify")
        action = draw(st.sampled_from(actions), label="action")
        if action == "read_verdict":
            drafter.apply_verdict(*to_drafter.popleft())
        elif action == "draft":
            draft()
        elif action == "deliver":
            deliver()
        else:
            verify()
        check_stream(stream, committed, drafter, to_drafter)

    # Quiesce: every verdict read, every piece delivered. Nothing the drafter still holds may be
    # missing from the stream (a stream that dropped everything would pass the checks above).
    while to_drafter:
        drafter.apply_verdict(*to_drafter.popleft())
    while to_verifier:
        deliver()
    check_stream(stream, committed, drafter, to_drafter)
    assert drafter.committed == committed
    if stream.epoch == drafter.epoch:
        assert stream.tokens == drafter.spec
    else:
        assert drafter.spec == [] and len(stream) == 0
    # and the stream picks up what the drafter drafts next
    if len(drafter.spec) < lookahead:
        draft()
        deliver()
        assert stream.epoch == drafter.epoch and stream.tokens == drafter.spec
