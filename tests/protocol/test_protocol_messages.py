"""Message invariants: what each dataclass accepts and refuses at construction."""

import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from protocol import (
    CandidateTree,
    ContextUpdate,
    Error,
    ErrorCode,
    Handshake,
    HandshakeRefused,
    InvalidMessage,
    InvalidTree,
    ModelFingerprint,
    ProtocolError,
    RemoteError,
    Role,
    Shutdown,
    Verdict,
    model_fingerprint,
)

FP = ModelFingerprint(vocab_size=1000, tokenizer_hash="ab" * 32)
CHAIN = dict(token_ids=[5, 6, 7, 8], parents=[-1, 0, 1, 2])


def tree(**overrides):
    fields = dict(session_id="s", step=1, **CHAIN)
    fields.update(overrides)
    return CandidateTree(**fields)


@pytest.mark.parametrize("parents", [
    [0, 0, 1, 2],        # root has a parent
    [-1, 1, 1, 2],       # node 1 is its own parent
    [-1, 0, 3, 2],       # forward reference (not topological; would allow a cycle 2->3->2)
    [-1, 0, -1, 2],      # second root
    [-1, 0, 1],          # one parent short
    [-1, 0, 1, 2, 3],    # one parent too many
    [-1, 0, 1.0, 2],     # not an int
])
def test_tree_rejects_parents_that_are_not_a_topological_tree(parents):
    with pytest.raises(InvalidTree):
        tree(parents=parents)


def test_tree_rejects_empty_tree():
    with pytest.raises(InvalidTree):
        tree(token_ids=[], parents=[])


def test_tree_accepts_numpy_and_torch_indices_and_normalises_to_int_tuples():
    from_numpy = tree(token_ids=np.array([5, 6, 7, 8], np.int64), parents=np.array([-1, 0, 0, 1]))
    from_torch = tree(token_ids=torch.tensor([5, 6, 7, 8]), parents=torch.tensor([-1, 0, 0, 1]))
    assert from_numpy.token_ids == from_torch.token_ids == (5, 6, 7, 8)
    assert from_numpy.parents == (-1, 0, 0, 1) and all(type(p) is int for p in from_numpy.parents)


@pytest.mark.parametrize("probs", [
    np.ones((4, 3), np.float64),          # wrong dtype
    np.ones((3, 3), np.float32),          # wrong N
    np.ones((4, 3, 2), np.float32),       # wrong rank
    torch.ones(4, dtype=torch.float16),   # wrong dtype (torch)
    [0.1, 0.2, 0.3, 0.4],                 # not a tensor
])
def test_tree_rejects_bad_draft_probs(probs):
    with pytest.raises(InvalidMessage):
        tree(draft_probs=probs)


@pytest.mark.parametrize("probs", [np.arange(4, dtype=np.float32), torch.arange(40, dtype=torch.float32).view(4, 10)])
def test_tree_accepts_float32_probs_of_shape_n_or_nv_and_they_cross_the_wire(probs):
    from protocol import decode, encode

    sent = tree(draft_probs=probs)
    received = decode([bytes(f) for f in encode(sent)])
    assert received == sent
    assert np.array_equal(np.asarray(received.draft_probs), np.asarray(probs))
    assert np.asarray(received.draft_probs).shape == tuple(probs.shape)


def test_tree_equality_compares_probs():
    probs = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert tree(draft_probs=probs) == tree(draft_probs=probs.copy())
    assert tree(draft_probs=probs) != tree(draft_probs=probs + 1)
    assert tree(draft_probs=probs) != tree()


def test_path_tokens_follows_the_tree_and_rejects_non_chains():
    branchy = tree(token_ids=[1, 2, 3, 4, 5], parents=[-1, 0, 0, 1, 3])
    assert branchy.path_tokens([1, 3, 4]) == (2, 4, 5)
    assert branchy.path_tokens([]) == ()
    for bad in ([3], [1, 2], [2, 3], [1, 3, 9]):
        with pytest.raises(InvalidTree):
            branchy.path_tokens(bad)


@pytest.mark.parametrize("fields", [
    dict(session_id="", step=0),                  # empty session id
    dict(session_id="x" * 129, step=0),           # too long
    dict(session_id="\ud800", step=0),            # not encodable as UTF-8
    dict(session_id="s", step=-1),
    dict(session_id="s", step=1.5),
    dict(session_id="s", step=True),
    dict(session_id=7, step=0),
])
def test_common_fields_are_checked(fields):
    with pytest.raises(InvalidMessage):
        Shutdown(**fields)


def test_verdict_checks_path_and_lengths():
    Verdict(session_id="s", step=1, accepted_path=[1, 3, 4], bonus_token_id=2, committed_length=10)
    for path in ([0, 1], [2, 2], [3, 1]):  # root included, repeated, decreasing
        with pytest.raises(InvalidMessage):
            Verdict(session_id="s", step=1, accepted_path=path, bonus_token_id=2, committed_length=10)
    with pytest.raises(InvalidMessage):  # cannot commit fewer tokens than it accepted + bonus
        Verdict(session_id="s", step=1, accepted_path=[1, 2], bonus_token_id=2, committed_length=2)
    with pytest.raises(InvalidMessage):
        Verdict(session_id="s", step=1, accepted_path=[1], bonus_token_id=-1, committed_length=5)


def test_context_update_prompt_starts_at_zero_and_reports_committed_length():
    update = ContextUpdate(session_id="s", step=0, token_ids=[1, 2, 3], position=0, is_prompt=True)
    assert update.committed_length == 3
    with pytest.raises(InvalidMessage):
        ContextUpdate(session_id="s", step=0, token_ids=[1], position=4, is_prompt=True)
    with pytest.raises(InvalidMessage):
        ContextUpdate(session_id="s", step=0, token_ids=[-3], position=0)


def test_other_messages_check_their_fields():
    with pytest.raises(InvalidMessage):
        Shutdown(session_id="s", step=0, reason="x" * 5000)
    with pytest.raises(InvalidMessage):
        Handshake(session_id="s", step=0, role="boss", fingerprint=FP)
    with pytest.raises(InvalidMessage):
        ModelFingerprint(vocab_size=0, tokenizer_hash="x")


def test_handshake_refusal_reasons():
    drafter = Handshake(session_id="s", step=0, role=Role.DRAFTER, fingerprint=FP)
    verifier = Handshake(session_id="s", step=0, role="verifier", fingerprint=FP)
    assert verifier.refusal_reason(drafter) is None
    assert "role" in verifier.refusal_reason(verifier)
    other_model = Handshake(session_id="s", step=0, role=Role.DRAFTER,
                            fingerprint=ModelFingerprint(vocab_size=1001, tokenizer_hash=FP.tokenizer_hash))
    assert "fingerprint" in verifier.refusal_reason(other_model)
    old_peer = Handshake(session_id="s", step=0, role=Role.DRAFTER, fingerprint=FP, version=0)
    assert "version" in verifier.refusal_reason(old_peer)


def test_model_fingerprint_depends_on_vocab_not_dict_order():
    vocab = {"a": 0, "b": 1, "ab": 2, "\u0120the": 3}
    same = model_fingerprint(100, dict(reversed(list(vocab.items()))))
    assert model_fingerprint(100, vocab) == same
    assert model_fingerprint(101, vocab) != same
    assert model_fingerprint(100, {**vocab, "ab": 4}).tokenizer_hash != same.tokenizer_hash
    # length prefixes: moving a character between tokens changes the hash
    assert model_fingerprint(100, {"ab": 0, "c": 1}) != model_fingerprint(100, {"a": 0, "bc": 1})
    assert len(same.tokenizer_hash) == 64


def test_error_maps_codes_back_to_exception_classes():
    sent = Error.from_exception(InvalidTree("bad parents"), session_id="s", step=3)
    assert sent.code == ErrorCode.INVALID_TREE and "bad parents" in sent.detail
    assert type(sent.to_exception()) is InvalidTree
    assert type(Error(session_id="s", step=0, code=ErrorCode.HANDSHAKE_REFUSED).to_exception()) is HandshakeRefused
    assert type(Error(session_id="s", step=0, code=999).to_exception()) is RemoteError
    assert Error.from_exception(KeyError("x")).code == ErrorCode.REMOTE
    assert all(issubclass(type(Error(session_id="s", step=0, code=c).to_exception()), ProtocolError)
               for c in ErrorCode)


PROTOCOL_DIR = pathlib.Path(__file__).resolve().parents[2] / "protocol"


def test_protocol_imports_neither_ray_nor_torch_nor_model_code():
    code = ("import sys, protocol, protocol.channel, protocol.codec;"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'ray', 'transformers', 'actors', 'cluster', 'decoding')];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_in_protocol_sources():
    for path in PROTOCOL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any("pickle" in name or name == "marshal" for name in names), path


def test_tree_position_is_a_non_negative_int():
    assert tree(position=7).position == 7
    assert tree().position is None
    for bad in (-1, 1.5, "3"):
        with pytest.raises(InvalidMessage):
            tree(position=bad)


def test_tree_pre_drafted_rank_is_bounded_and_crosses_the_wire():
    assert tree().pre_drafted is None
    from protocol import decode, encode

    assert decode([bytes(f) for f in encode(tree(pre_drafted=3))]).pre_drafted == 3
    for bad in (-1, 1024, 1.5):
        with pytest.raises(InvalidMessage):
            tree(pre_drafted=bad)


def test_hidden_states_cross_the_wire_intact_and_bad_ones_are_refused():
    import torch

    from protocol import decode, encode

    for hidden in (np.arange(1536, dtype=np.float32), torch.arange(1536, dtype=torch.float16),
                   np.linspace(0, 1, 30_000, dtype=np.float32)):  # 120 KB: its own frame
        for message in (Verdict(session_id="s", step=1, accepted_path=[1], bonus_token_id=2, committed_length=10,
                                hidden=hidden),
                        ContextUpdate(session_id="s", step=0, token_ids=[5], position=9, hidden=hidden)):
            back = decode(encode(message))
            assert back == message and np.array_equal(np.asarray(back.hidden), np.asarray(hidden))
    assert decode(encode(Verdict(session_id="s", step=1, accepted_path=[], bonus_token_id=2,
                                 committed_length=10))).hidden is None
    for bad, why in ((np.zeros((2, 4), np.float32), "shape"), (np.zeros(4, np.int32), "float32 or float16"),
                     ([0.5, 0.5], "numpy array or torch tensor"), (np.zeros(0, np.float32), "shape")):
        with pytest.raises(InvalidMessage, match=why):
            Verdict(session_id="s", step=1, accepted_path=[], bonus_token_id=2, committed_length=10, hidden=bad)
        with pytest.raises(InvalidMessage, match=why):
            ContextUpdate(session_id="s", step=0, token_ids=[5], position=9, hidden=bad)
