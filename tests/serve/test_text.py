"""Token ids to streamed text: nothing past a stop string, nothing half a character."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.serve.text import TextStream

from tiny import char_tokenizer

TOK = char_tokenizer(64)


def ids(text: str) -> list[int]:
    return TOK(text)["input_ids"]


def run(stream: TextStream, pieces: list[str]) -> str:
    out = "".join(stream.push(ids(p)) for p in pieces if not stream.stopped)
    return out + stream.finish()


def test_without_stops_the_text_is_the_decoded_ids():
    assert run(TextStream(TOK, []), ["hel", "lo ", "world"]) == "hello world"


def test_a_stop_split_across_tokens_is_never_released():
    stream = TextStream(TOK, ["lo w"])
    released = [stream.push(ids(p)) for p in ["hel", "l", "o", " ", "w", "orld"] if not stream.stopped]
    assert "".join(released) == "hel" and stream.stopped
    assert stream.finish() == "" and stream.released == "hel"


def test_a_held_back_prefix_is_released_once_it_cannot_be_a_stop():
    stream = TextStream(TOK, ["xyz"])
    assert stream.push(ids("abx")) == "ab"
    assert stream.push(ids("q")) == "xq"
    assert stream.finish() == "" and stream.released == "abxq"


class ByteTokenizer:
    """Each id is one byte; decoding replaces an unfinished UTF-8 sequence with U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_half_a_character_waits_for_the_rest():
    stream = TextStream(ByteTokenizer(), [])
    euro = list("€".encode())
    assert stream.push(euro[:2]) == ""
    assert stream.push(euro[2:] + [ord("!")]) == "€!"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc ", min_size=1, max_size=30), stop=st.text(alphabet="abc", min_size=1, max_size=3),
       cuts=st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_released_text_is_the_text_up_to_the_first_stop(text, stop, cuts):
    pieces, i = [], 0
    for c in cuts + [len(text)]:
        if i < len(text):
            pieces.append(text[i:i + c])
            i += c
    expected = text.split(stop)[0]
    assert run(TextStream(TOK, [stop]), pieces) == expected


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="aé€😀 ", min_size=1, max_size=20), cuts=st.lists(st.integers(1, 4), min_size=1))
def test_multibyte_text_split_anywhere_comes_out_whole(text, cuts):
    data, pieces, i = list(text.encode()), [], 0
    for c in cuts + [len(data)]:
        if i < len(data):
            pieces.append(data[i:i + c])
            i += c
    stream = TextStream(ByteTokenizer(), [])
    assert "".join(stream.push(p) for p in pieces) + stream.finish() == text


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return super().decode(ids)


def test_each_push_decodes_a_short_window_not_everything_so_far():
    tok = CountingTokenizer()
    stream = TextStream(tok, [])
    for _ in range(500):
        stream.push([ord("a")])
    assert stream.finish() == "" and stream.released == "a" * 500
    assert tok.decoded < 5 * 500  # re-decoding everything each time would be ~125,000
