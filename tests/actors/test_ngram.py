"""Prompt lookup's index: the longest earlier suffix wins, its latest occurrence is used,
the suffix never finds itself, and appending tokens keeps the index as a fresh one."""

from __future__ import annotations

import pytest

from actors.drafters.ngram import NgramIndex


def test_the_longest_suffix_that_occurred_before_gives_what_followed_it():
    idx = NgramIndex(max_ngram=3)
    # "7 8 9" occurred once (followed by 1 2); "9" alone last occurred before 5 5
    tokens = [7, 8, 9, 1, 2, 3, 9, 5, 5, 4, 7, 8, 9]
    assert idx.match(tokens, 4) == (3, [1, 2, 3, 9])
    assert idx.match(tokens, 2)[1] == [1, 2]


def test_the_latest_occurrence_wins_and_a_shorter_suffix_is_the_fallback():
    idx = NgramIndex(max_ngram=3)
    assert idx.match([4, 1, 2, 4, 3, 6, 4], 3)[1] == [3, 6, 4]  # "4": latest earlier one is at 3
    assert NgramIndex().match([1, 2, 3], 4)[1] == []  # nothing repeats
    assert NgramIndex().match([5], 4)[1] == []
    assert NgramIndex().match([5, 5], 4)[1] == [5]  # the first 5 is followed by the second


def test_growing_the_tokens_indexes_as_a_fresh_index_would():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8]
    grown = NgramIndex()
    for n in range(1, len(tokens) + 1):
        assert grown.match(tokens[:n], 5)[1] == NgramIndex().match(tokens[:n], 5)[1], n


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="1 <= min <= max"):
        NgramIndex(max_ngram=0)


def test_acceptance_is_learned_per_matched_length_and_weak_matches_stop_being_drafted():
    from actors.drafters.ngram import NgramDrafter
    from decoding.acceptance import Verdict
    from decoding.request import DecodeConfig
    from decoding.sequence import Sequence

    drafter = NgramDrafter(max_draft=4, verify_s={1: 1.0, 2: 1.3, 4: 1.6, 8: 2.2})  # a quantized target's curve
    seq = Sequence("s", [9, 1, 2, 3, 4, 9], DecodeConfig(max_new_tokens=50), True, None)
    drafter.start(seq, None)
    assert drafter._lookup(seq)[1] == [1, 2, 3, 4]  # "9" matched: a 1-token match
    assert drafter.propose([seq], None)["s"].drafted > 0  # the prior says try
    for _ in range(10):  # every 1-token match rejected at once
        draft = drafter.propose([seq], None).get("s")
        if draft is None:
            break
        drafter.observe(seq, draft, Verdict([], 0), None)
    # one more token pays only if accepted with p > 0.3 (verify of 2 costs 1.3x one)
    assert drafter.acceptance[1].rate < 0.3 and drafter.propose([seq], None) == {}
    assert drafter.acceptance[3].rate == 0.5  # longer matches keep their own estimate
    retried = [bool(drafter.propose([seq], None)) for _ in range(16)]  # now and then, one token is tried again
    assert retried.count(True) == 1
