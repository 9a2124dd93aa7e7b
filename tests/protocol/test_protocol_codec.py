"""Codec: hypothesis round trips for every message type, and one typed error per bad input."""

import pickle

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    INLINE_TENSOR_LIMIT,
    MESSAGE_TYPES,
    NO_SESSION,
    PROTOCOL_VERSION,
    AuthenticationError,
    CandidateTree,
    ContextUpdate,
    DraftCall,
    EnsembleCall,
    EnsembleRows,
    Error,
    Handshake,
    InvalidTree,
    MalformedMessage,
    MessageTooLarge,
    ModelFingerprint,
    Role,
    SharedSecret,
    Shutdown,
    TensorMismatch,
    UnknownMessageType,
    Verdict,
    VersionMismatch,
    decode,
    encode,
    is_zero_copy,
    owning_frame,
)
from protocol.fields import MAX_STEP, MAX_TOKEN_ID

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------------

session_ids = st.one_of(st.text(min_size=1, max_size=128).filter(lambda s: s.isascii()),
                        st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40))
steps = st.integers(0, MAX_STEP)
token_lists = st.lists(st.integers(0, MAX_TOKEN_ID), max_size=300)
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300)


@st.composite
def common(draw):
    return dict(session_id=draw(session_ids), step=draw(steps))


@st.composite
def trees(draw):
    n = draw(st.integers(1, 80))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    token_ids = draw(st.lists(st.integers(0, MAX_TOKEN_ID), min_size=n, max_size=n))
    probs_kind = draw(st.sampled_from(["none", "vector", "small_matrix", "frame_matrix"]))
    probs = None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if probs_kind == "vector":
        probs = rng.random(n, dtype=np.float32)
    elif probs_kind == "small_matrix":
        probs = rng.random((n, draw(st.integers(0, 64))), dtype=np.float32)
    elif probs_kind == "frame_matrix":  # at or above the inline limit: travels in its own frame
        vocab = -(-INLINE_TENSOR_LIMIT // (4 * n)) + draw(st.integers(0, 50))
        probs = rng.random((n, vocab), dtype=np.float32)
        if draw(st.booleans()):
            probs[0, 0] = np.nan
    if probs is not None and draw(st.booleans()):
        probs = torch.from_numpy(probs)
    as_array = draw(st.booleans())
    return CandidateTree(**draw(common()), token_ids=np.array(token_ids, np.int64) if as_array else token_ids,
                         parents=parents, draft_probs=probs)


@st.composite
def verdicts(draw):
    path = sorted(draw(st.sets(st.integers(1, 10_000), max_size=40)))
    return Verdict(**draw(common()), accepted_path=path, bonus_token_id=draw(st.integers(0, MAX_TOKEN_ID)),
                   committed_length=draw(st.integers(len(path) + 1, MAX_STEP)))


@st.composite
def handshakes(draw):
    fingerprint = ModelFingerprint(vocab_size=draw(st.integers(1, MAX_TOKEN_ID)),
                                   tokenizer_hash=draw(st.text(min_size=1, max_size=128).filter(str.isascii)))
    return Handshake(**draw(common()), role=draw(st.sampled_from(list(Role))), fingerprint=fingerprint)


@st.composite
def context_updates(draw):
    is_prompt = draw(st.booleans())
    position = 0 if is_prompt else draw(st.integers(0, MAX_STEP))
    return ContextUpdate(**draw(common()), token_ids=draw(token_lists), position=position, is_prompt=is_prompt)


@st.composite
def ensemble_calls(draw):
    tokens = draw(token_lists)
    position = draw(st.integers(1, 10_000))  # a context of at least one token
    return EnsembleCall(**draw(common()), kind=draw(st.sampled_from(["score", "prefill", "draft"])),
                        token_ids=tokens, position=position, batch=draw(st.integers(1, 4096)),
                        count=draw(st.integers(1, min(2**16, position + len(tokens)))))


@st.composite
def ensemble_rows(draw):
    rows = draw(st.integers(1, 8))
    vocab = draw(st.sampled_from([1, 7, -(-INLINE_TENSOR_LIMIT // (4 * rows)) + 3]))
    logits = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((rows, vocab)).astype(np.float32)
    tokens = draw(st.one_of(st.just([]), st.lists(st.integers(0, MAX_TOKEN_ID), min_size=rows, max_size=rows)))
    return EnsembleRows(**draw(common()), token_ids=tokens, logits=logits,
                        seconds=draw(st.floats(0, 1e6, allow_nan=False)))


messages_by_type = {
    Handshake: handshakes(),
    ContextUpdate: context_updates(),
    CandidateTree: trees(),
    Verdict: verdicts(),
    Error: st.builds(lambda c, code, d: Error(**c, code=code, detail=d), common(), st.integers(0, 2**16), texts),
    Shutdown: st.builds(lambda c, r: Shutdown(**c, reason=r), common(), texts),
    EnsembleCall: ensemble_calls(),
    EnsembleRows: ensemble_rows(),
    DraftCall: st.builds(
        lambda c, ids, pos, depth, rem, batch, alone, t, p, k, seed: DraftCall(
            **c, token_ids=ids, position=pos, depth=depth, remaining=rem, batch=batch, alone=alone, temperature=t,
            top_p=p, top_k=k, seed=seed),
        common(), st.lists(st.integers(0, MAX_TOKEN_ID), min_size=1, max_size=20), st.integers(0, MAX_STEP),
        st.integers(1, 64), st.integers(2, 10**6), st.integers(1, 64), st.booleans(),
        st.floats(0, 5), st.floats(0, 1), st.integers(0, 100), st.none() | st.integers(0, 2**63 - 1)),
}


def test_strategies_cover_every_message_type():
    assert set(messages_by_type) == set(MESSAGE_TYPES.values())


def as_numpy(message):
    """Same message with draft probs as numpy (decode returns numpy by default)."""
    if isinstance(message, CandidateTree) and isinstance(message.draft_probs, torch.Tensor):
        return CandidateTree(session_id=message.session_id, step=message.step, token_ids=message.token_ids,
                             parents=message.parents, draft_probs=message.draft_probs.numpy())
    return message


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("message_type", list(messages_by_type), ids=lambda t: t.__name__)
def test_round_trip_every_message_type(message_type):
    @PROPERTY
    @given(messages_by_type[message_type])
    def check(message):
        frames = encode(message)
        # As received from the network: fresh bytes, nothing shared with the sender.
        received = decode([bytes(frame) for frame in frames])
        assert type(received) is message_type
        assert received == as_numpy(message)
        assert received.version == message.version

    check()


@PROPERTY
@given(trees(), st.binary(min_size=16, max_size=64))
def test_round_trip_signed_and_into_torch(tree, key):
    secret = SharedSecret(key)
    received = decode([bytes(f) for f in encode(tree, secret=secret)], secret=secret, tensor_lib="torch")
    assert received == as_numpy(tree)
    if tree.draft_probs is not None:
        assert isinstance(received.draft_probs, torch.Tensor)
        assert received.draft_probs.dtype == torch.float32


def test_small_tensors_go_inline_large_ones_in_their_own_frame():
    small = CandidateTree(session_id="s", step=0, token_ids=[1, 2], parents=[-1, 0],
                          draft_probs=np.zeros((2, INLINE_TENSOR_LIMIT // 8 - 1), np.float32))
    large = CandidateTree(session_id="s", step=0, token_ids=[1, 2], parents=[-1, 0],
                          draft_probs=np.zeros((2, INLINE_TENSOR_LIMIT // 8), np.float32))
    assert len(encode(small)) == 1
    frames = encode(large)
    assert len(frames) == 2 and len(frames[1]) == INLINE_TENSOR_LIMIT


def test_large_tensor_is_sent_and_decoded_without_copies():
    probs = np.random.default_rng(0).random((16, 4096), dtype=np.float32)
    frames = encode(CandidateTree(session_id="s", step=0, token_ids=[0] * 16, parents=[-1] + [0] * 15,
                                  draft_probs=probs))
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), probs)  # sender: the caller's memory
    wire = bytearray(frames[1])  # stand-in for the received frame
    received = decode([frames[0], wire])
    assert is_zero_copy(received.draft_probs, wire)  # receiver: a view on the frame
    assert owning_frame(received.draft_probs) is wire
    wire[:4] = np.float32(42.0).tobytes()  # writes to the frame show through: same memory
    assert received.draft_probs[0, 0] == 42.0
    as_torch = decode([frames[0], wire], tensor_lib="torch").draft_probs
    assert is_zero_copy(as_torch, wire) and as_torch[0, 0].item() == 42.0


def test_big_endian_and_non_contiguous_tensors_are_normalised():
    probs = np.arange(64 * 600, dtype=">f4").reshape(600, 64).T  # big-endian, transposed view
    tree = CandidateTree(session_id="s", step=0, token_ids=[0] * 64, parents=[-1] + [0] * 63, draft_probs=probs)
    received = decode([bytes(f) for f in encode(tree)])
    assert received.draft_probs.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(received.draft_probs, probs)


# -- one typed error per kind of bad input ---------------------------------------------------

TREE = CandidateTree(session_id="s", step=3, token_ids=[9, 8, 7], parents=[-1, 0, 1],
                     draft_probs=np.ones((3, 8192), np.float32))


def repack(frames, edit):
    header = msgpack.unpackb(frames[0], use_list=True)
    edit(header)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def test_truncated_header_is_malformed():
    frames = encode(TREE)
    for cut in (0, 1, len(frames[0]) // 2, len(frames[0]) - 1):
        with pytest.raises(MalformedMessage):
            decode([frames[0][:cut], frames[1]])


def test_missing_or_extra_frames_are_malformed():
    frames = encode(TREE)
    with pytest.raises(MalformedMessage):
        decode(frames[:1])
    with pytest.raises(MalformedMessage):
        decode([*frames, b"extra"])
    with pytest.raises(MalformedMessage):
        decode([])


def test_truncated_tensor_frame_is_a_tensor_mismatch():
    frames = encode(TREE)
    with pytest.raises(TensorMismatch):
        decode([frames[0], bytes(frames[1])[:-4]])


def test_wrong_shape_or_dtype_is_a_tensor_mismatch():
    frames = encode(TREE)

    def set_shape(h):
        h[5][0][2] = [3, 8193]

    def set_dtype(h):
        h[5][0][1] = "float64"

    def set_object_dtype(h):
        h[5][0][1] = "object"

    for edit in (set_shape, set_dtype, set_object_dtype):
        with pytest.raises(TensorMismatch):
            decode(repack(frames, edit))


def test_an_empty_tensor_of_impossible_shape_is_a_tensor_mismatch():
    """(0, 2**62) float32 matches zero bytes; numpy then refuses the shape with a plain
    ValueError, which would kill a serve loop that catches ProtocolError."""
    frames = encode(TREE)

    def empty_and_huge(h):
        h[5][0][2], h[5][0][3] = [0, 2**62], b""

    with pytest.raises(TensorMismatch, match="too large"):
        decode(repack(frames, empty_and_huge)[:1])


def test_unknown_type_and_wrong_version():
    frames = encode(TREE)
    with pytest.raises(UnknownMessageType):
        decode(repack(frames, lambda h: h.__setitem__(1, 99)))
    with pytest.raises(VersionMismatch):
        decode(repack(frames, lambda h: h.__setitem__(0, PROTOCOL_VERSION + 1)))
    # a future version may change everything after the version field: still VersionMismatch
    with pytest.raises(VersionMismatch):
        decode([msgpack.packb([PROTOCOL_VERSION + 1, "whatever", {"new": "layout"}])])


def test_parents_that_are_not_a_tree_raise_invalid_tree_at_the_receiver():
    frames = encode(TREE)
    for parents in ([-1, 2, 1], [0, 0, 1], [-1, 0], [-1, 0, 5]):
        with pytest.raises(InvalidTree):
            decode(repack(frames, lambda h: h[4].__setitem__(1, parents)))


def test_size_limit_is_enforced_before_decoding_and_at_the_sender():
    frames = encode(TREE)
    with pytest.raises(MessageTooLarge):
        decode(frames, max_message_bytes=len(frames[1]))
    with pytest.raises(MessageTooLarge):  # 2 GB of claimed payload, never unpacked
        decode([b"\xc6\x7f\xff\xff\xff" + b"\x00" * 10], max_message_bytes=8)
    with pytest.raises(MessageTooLarge):
        encode(TREE, max_message_bytes=1000)


def test_pickle_and_ext_types_are_not_messages():
    with pytest.raises(MalformedMessage):
        decode([pickle.dumps(TREE)])
    with pytest.raises(MalformedMessage):
        decode([msgpack.packb([PROTOCOL_VERSION, 3, "s", 0, msgpack.ExtType(1, b"x"), []])])
    with pytest.raises(MalformedMessage):
        decode([msgpack.packb({"version": 1})])


def test_signatures_are_checked_before_anything_else():
    secret = SharedSecret(b"k" * 32)
    frames = encode(TREE, secret=secret)
    assert decode(frames, secret=secret) == TREE
    with pytest.raises(AuthenticationError):
        decode(encode(TREE), secret=secret)  # unsigned
    with pytest.raises(AuthenticationError):
        decode(frames, secret=SharedSecret(b"j" * 32))  # other key
    tampered = bytearray(frames[1])
    tampered[100] ^= 1
    with pytest.raises(AuthenticationError):
        decode([frames[0], tampered, frames[2]], secret=secret)
    with pytest.raises(AuthenticationError):  # bytes moved across a frame boundary
        decode([bytes(frames[0]) + bytes(frames[1])[:4], bytes(frames[1])[4:], frames[2]], secret=secret)
    with pytest.raises(AuthenticationError):  # garbage never reaches msgpack
        decode([b"\xc1" * 10, b"\x00" * 32], secret=secret)


def test_no_session_error_round_trips():
    error = Error(session_id=NO_SESSION, step=0, code=2, detail="could not decode")
    assert decode(encode(error)) == error
