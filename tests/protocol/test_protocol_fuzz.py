"""Fuzz: mutated frames must decode to a valid message or raise a typed ProtocolError.

Deterministic (seeded) so that a failure reproduces; every failure reports the mutation.
"""

import collections
import random

import msgpack
import numpy as np

from protocol import (
    CandidateTree,
    ContextUpdate,
    DraftCall,
    EnsembleCall,
    EnsembleRows,
    Error,
    Handshake,
    Message,
    ModelFingerprint,
    ProtocolError,
    Role,
    SharedSecret,
    Shutdown,
    Verdict,
    decode,
    encode,
)

MUTATED_MESSAGES = 12_000
SECRET = SharedSecret(b"fuzz-secret-0123456789")


def corpus() -> list[Message]:
    rng = np.random.default_rng(7)
    fingerprint = ModelFingerprint(vocab_size=151936, tokenizer_hash="f" * 64)
    chain = dict(token_ids=[11, 12, 13, 14, 15, 16], parents=[-1, 0, 1, 1, 3, 2])
    return [
        Handshake(session_id="sess", step=0, role=Role.DRAFTER, fingerprint=fingerprint),
        ContextUpdate(session_id="sess", step=1, token_ids=list(range(50)), position=0, is_prompt=True),
        ContextUpdate(session_id="sess", step=9, token_ids=[3, 4], position=77),
        CandidateTree(session_id="sess", step=2, **chain),
        CandidateTree(session_id="sess", step=2, **chain, draft_probs=rng.random(6, dtype=np.float32)),
        CandidateTree(session_id="sess", step=2, **chain, draft_probs=rng.random((6, 50), dtype=np.float32)),
        # 6 x 2731 x 4 bytes > 64 KiB: an out-of-band tensor frame
        CandidateTree(session_id="sess", step=2, **chain, draft_probs=rng.random((6, 2731), dtype=np.float32)),
        Verdict(session_id="sess", step=2, accepted_path=[1, 3, 4], bonus_token_id=99, committed_length=60),
        # protocol 3: hidden states for draft heads, inline and in their own frame
        Verdict(session_id="sess", step=2, accepted_path=[1], bonus_token_id=9, committed_length=60,
                hidden=rng.random(1536, dtype=np.float32)),
        ContextUpdate(session_id="sess", step=9, token_ids=[3], position=77,
                      hidden=rng.random(40_000).astype(np.float16)),
        # the batched draft server's call (protocol 4), with and without the heads' hidden state
        DraftCall(session_id="sess", step=5, token_ids=[7, 8, 9], position=40, depth=4, remaining=60, batch=3),
        DraftCall(session_id="sess", step=5, token_ids=[7], position=40, depth=8, remaining=2, batch=1, alone=True,
                  temperature=0.7, top_p=0.9, top_k=40, seed=3, hidden=rng.random(896, dtype=np.float32)),
        # the ensemble's calls and rows, logits inline and in their own frame
        EnsembleCall(session_id="sess", step=6, kind="score", token_ids=[1, 2, 3], position=10, count=4),
        EnsembleCall(session_id="sess", step=6, kind="draft", token_ids=[], position=10, count=3),
        EnsembleCall(session_id="sess", step=7, kind="prefill", token_ids=[4, 5], position=0, count=1, batch=12),
        EnsembleRows(session_id="sess", step=6, token_ids=[4, 5], logits=rng.random((2, 50), dtype=np.float32),
                     seconds=0.01),
        EnsembleRows(session_id="sess", step=6, token_ids=[], logits=rng.random((4, 5000), dtype=np.float32)),
        Error(session_id="sess", step=3, code=8, detail="bad tree"),
        Shutdown(session_id="sess", step=4, reason="done"),
    ]


def random_value(rng: random.Random):
    return rng.choice([
        None, True, -1, 0, 1, 2, 7, 99, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("nan"),
        "", "x", "float32", "object", "<f4", b"", b"\x00" * 8, [], [1, 2], [-1, 0, 0], [[1]], {}, {"a": 1},
        [0, "float32", [6, 2731], None], [2, "float32", [1], b"\x00\x00\x80\x3f"],
    ])


def mutate_structure(value, rng: random.Random):
    """Replace one randomly chosen element somewhere inside a nested list."""
    if isinstance(value, list) and value and rng.random() < 0.75:
        index = rng.randrange(len(value))
        value[index] = mutate_structure(value[index], rng)
        return value
    if isinstance(value, list) and rng.random() < 0.5:
        return value + [random_value(rng)] if rng.random() < 0.5 else value[:-1]
    return random_value(rng)


def mutate(frames: list[bytes], rng: random.Random) -> tuple[str, list[bytes]]:
    frames = [bytearray(frame) for frame in frames]
    target = rng.randrange(len(frames))
    frame = frames[target]
    kind = rng.choice(["flip", "overwrite", "truncate", "extend", "drop", "duplicate", "swap",
                       "add", "garbage_header", "structure", "structure", "structure", "empty_huge_tensor",
                       "frame_flood", "oversize"])
    if kind == "flip" and frame:
        for _ in range(rng.randint(1, 8)):
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
    elif kind == "overwrite" and frame:
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
    elif kind == "truncate":
        del frame[rng.randrange(len(frame) + 1):]
    elif kind == "extend":
        frame.extend(rng.randbytes(rng.randint(1, 16)))
    elif kind == "drop":
        del frames[target]
    elif kind == "duplicate":
        frames.insert(target, bytearray(frame))
    elif kind == "swap" and len(frames) > 1:
        other = rng.randrange(len(frames))
        frames[target], frames[other] = frames[other], frames[target]
    elif kind == "add":
        frames.append(bytearray(rng.randbytes(rng.randint(0, 64))))
    elif kind == "garbage_header":
        frames[0] = bytearray(rng.randbytes(rng.randint(0, 40)))
    elif kind == "frame_flood":  # thousands of empty frames after the message
        frames.extend(bytearray() for _ in range(rng.choice([100, 5000])))
    elif kind == "oversize":  # more bytes in all than the receiver accepts
        frames.append(bytearray(1 << 20))
    elif kind == "empty_huge_tensor":  # zero bytes that match a shape numpy cannot hold
        try:
            header = msgpack.unpackb(bytes(frames[0]), strict_map_key=False)
            desc = header[5][rng.randrange(len(header[5]))]
            desc[2], desc[3] = [0, *(rng.choice([2**31, 2**62, 2**63 - 1]) for _ in range(rng.randint(1, 3)))], b""
            frames = [bytearray(msgpack.packb(header, use_bin_type=True))]
        except Exception:  # no tensor in this message: leave it whole
            pass
    elif kind == "structure":
        try:
            header = msgpack.unpackb(bytes(frames[0]), strict_map_key=False)
        except Exception:
            header = None
        frames[0] = bytearray(msgpack.packb(mutate_structure(header, rng), use_bin_type=True))
    return kind, [bytes(frame) for frame in frames]


def test_10k_mutated_messages_raise_only_typed_errors():
    rng = random.Random(20240611)
    seeds = [(message, False) for message in corpus()] + [(message, True) for message in corpus()]
    encoded = [([bytes(f) for f in encode(m, secret=SECRET if signed else None)], signed) for m, signed in seeds]
    outcomes: collections.Counter[str] = collections.Counter()
    for attempt in range(MUTATED_MESSAGES):
        # Unsigned most of the time: signed input mostly stops at the signature check.
        frames, signed = encoded[rng.randrange(len(encoded))] if attempt % 10 == 0 else \
            encoded[rng.randrange(len(encoded) // 2)]
        kind, mutated = mutate(frames, rng)
        tensor_lib = "torch" if attempt % 50 == 0 else "numpy"
        try:
            message = decode(mutated, secret=SECRET if signed else None, max_message_bytes=1 << 20,
                             tensor_lib=tensor_lib)
        except ProtocolError as exc:
            outcomes[type(exc).__name__] += 1
            if kind == "frame_flood":  # refused on the count alone, before any frame is read
                assert type(exc).__name__ == "MessageTooLarge" and "frames" in str(exc), exc
            continue
        except Exception as exc:  # pragma: no cover - the failure we are looking for
            raise AssertionError(f"attempt {attempt}: mutation {kind!r} of {frames!r:.300} "
                                 f"raised untyped {exc!r}") from exc
        # Survivors must be genuine, re-encodable messages.
        assert isinstance(message, Message)
        encode(message)
        outcomes["decoded"] += 1

    assert sum(outcomes.values()) == MUTATED_MESSAGES
    # The mutations reach every check, not just the msgpack parser.
    for expected in ("MalformedMessage", "TensorMismatch", "InvalidTree", "InvalidMessage", "MessageTooLarge",
                     "UnknownMessageType", "VersionMismatch", "AuthenticationError"):
        assert outcomes[expected] > 0, outcomes
    print(dict(outcomes))
