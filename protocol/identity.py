"""Who is talking: a peer's role, the fingerprint of the model it serves (handshakes refuse
a mismatch), and session ids.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.fields import MAX_TOKEN_ID, as_int, as_text


class Role(str, enum.Enum):
    DRAFTER = "drafter"
    VERIFIER = "verifier"
    PEER = "peer"  # role-agnostic actors that take turns (ensembles); pairs only with PEER


COMPATIBLE_ROLES = {
    (Role.DRAFTER, Role.VERIFIER),
    (Role.VERIFIER, Role.DRAFTER),
    (Role.PEER, Role.PEER),
}


# ---------------------------------------------------------------------------------------------
# model fingerprint


@dataclass(frozen=True)
class ModelFingerprint:
    """What two peers must agree on to exchange token ids: vocabulary size and tokenizer."""

    vocab_size: int
    tokenizer_hash: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocab_size", as_int("vocab_size", self.vocab_size, 1, MAX_TOKEN_ID))
        as_text("tokenizer_hash", self.tokenizer_hash, 1, 128)


def model_fingerprint(vocab_size: int, vocab: Mapping[str | bytes, int]) -> ModelFingerprint:
    """Fingerprint from a vocab size and a tokenizer's vocabulary (`tokenizer.get_vocab()`).

    SHA-256 over the (token, id) pairs sorted by id then token, each length-prefixed so that
    no two vocabularies serialise alike. Takes a plain mapping: no transformers import here.
    """
    pairs = []
    for token, token_id in vocab.items():
        raw = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else bytes(token)
        pairs.append((int(token_id), raw))
    pairs.sort()
    digest = hashlib.sha256(b"specray-vocab-v1")
    for token_id, raw in pairs:
        digest.update(token_id.to_bytes(8, "little", signed=True))
        digest.update(len(raw).to_bytes(4, "little"))
        digest.update(raw)
    return ModelFingerprint(vocab_size=vocab_size, tokenizer_hash=digest.hexdigest())


def new_session_id() -> str:
    return uuid.uuid4().hex
