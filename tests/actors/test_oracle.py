"""The oracle drafter: drafts the target's own tokens at a controlled rate and cost, and
the sync and async pipelines stay lossless with it (real ZeroMQ sockets, two threads)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors import loading
from actors.model import Transformer
from actors.oracle import OracleRunner
from actors.pipeline_options import PipelineOptions
from actors.proposing import propose_request
from actors.runner import ModelRunner
from actors.verifying import verify_request
from cluster.local import autoregressive_generate
from decoding.draft_length import DraftLengthPolicy
from decoding.request import DecodeConfig
from decoding.sampling import SamplingParams
from protocol import ChannelConfig, DealerChannel, ModelFingerprint, RouterChannel, ipc_endpoint, new_session_id

V = 64
REFERENCE = torch.randint(0, V, (3000,), generator=torch.Generator().manual_seed(1)).tolist()
FINGERPRINT = ModelFingerprint(vocab_size=1, tokenizer_hash="t" * 64)
CHANNEL = ChannelConfig(tensor_lib="torch", recv_timeout_s=10, connection_heartbeat_s=None)


def drafts_along(runner: OracleRunner, reference: list[int], chunk: int = 1) -> list[int]:
    """The draft after each prefix of `reference`, fed `chunk` tokens at a time."""
    runner.reset()
    out = [int(runner.feed(reference[:1]).argmax())]
    for i in range(1, len(reference) - 1, chunk):
        logits = runner.feed(reference[i:i + chunk])
        out += [runner.draft_at(p) for p in range(i + 1, len(runner.tokens))] + [int(logits.argmax())]
    return out[: len(reference) - 1]


@pytest.mark.parametrize("acceptance", [0.0, 0.3, 0.8, 1.0])
def test_drafts_match_the_reference_at_the_requested_rate(acceptance):
    drafts = drafts_along(OracleRunner(REFERENCE, V, acceptance, seed=4), REFERENCE)
    rate = sum(d == r for d, r in zip(drafts, REFERENCE[1:])) / len(drafts)
    assert abs(rate - acceptance) < 0.04
    assert all(0 <= d < V for d in drafts)


def test_decisions_depend_only_on_position_and_seed():
    one = drafts_along(OracleRunner(REFERENCE[:500], V, 0.5, seed=7), REFERENCE[:500])
    chunked = drafts_along(OracleRunner(REFERENCE[:500], V, 0.5, seed=7), REFERENCE[:500], chunk=5)
    other_seed = drafts_along(OracleRunner(REFERENCE[:500], V, 0.5, seed=8), REFERENCE[:500])
    assert one == chunked
    assert one != other_seed


def test_beyond_the_reference_it_still_drafts():
    runner = OracleRunner([3, 4], V, 1.0)
    assert 0 <= int(runner.feed([3, 4, 5, 6]).argmax()) < V


def test_drafting_costs_the_requested_time_per_step():
    runner = OracleRunner(REFERENCE, V, 1.0, step_cost_s=0.02)
    start = time.perf_counter()
    runner.feed(REFERENCE[:10])
    assert time.perf_counter() - start >= 0.02
    start = time.perf_counter()
    proposal = runner.propose(REFERENCE[:12], SamplingParams(), DraftLengthPolicy(fixed=3), max_depth=8)
    assert proposal.depth == 3 and proposal.tree.is_chain()
    assert proposal.tree.tokens.tolist() == REFERENCE[11:15]  # acceptance 1: the reference itself
    assert proposal.draft_probs is None
    assert proposal.predicted == pytest.approx(3.0)
    assert proposal.seconds >= 3 * 0.02 and time.perf_counter() - start >= 3 * 0.02


def test_propose_respects_max_depth_and_refuses_sampling():
    runner = OracleRunner(REFERENCE, V, 0.9)
    assert runner.propose(REFERENCE[:5], SamplingParams(), DraftLengthPolicy(fixed=10), max_depth=2).depth == 2
    with pytest.raises(ValueError):
        runner.propose(REFERENCE[:5], SamplingParams(temperature=1.0), DraftLengthPolicy(), max_depth=2)


# ---- end to end through the pipelines -------------------------------------------------

def generate(target: ModelRunner, draft: OracleRunner, prompt: list[int], cfg: DecodeConfig, opts: PipelineOptions):
    """Verifier in this thread, the oracle drafting in another, over ipc sockets."""
    router, session, box = RouterChannel(ipc_endpoint(), config=CHANNEL), new_session_id(), {}

    def drafter():
        with DealerChannel(router.endpoint, config=CHANNEL) as dealer:
            try:
                box["stats"] = propose_request(draft, dealer, FINGERPRINT, session, cfg, opts)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                box["error"] = exc

    thread = threading.Thread(target=drafter, daemon=True)
    thread.start()
    try:
        result = verify_request(target, router, FINGERPRINT, session, prompt, cfg, opts, drafter_alive=thread.is_alive)
        thread.join(10)
    finally:
        router.close()
    assert not thread.is_alive() and "error" not in box, box
    return result, box["stats"]


def sync_rounds(oracle: OracleRunner, prompt_len: int, new: int, depth: int) -> tuple[int, int]:
    """(verify rounds, accepted drafts) a correct sync pipeline must report with a fixed draft
    length: each round drafts from the committed length, keeps the longest correct prefix,
    adds the target's own token, and never drafts past the requested length."""
    n, end, rounds, accepted = prompt_len + 1, prompt_len + new, 0, 0
    while n < end:
        d, a = min(depth, max(1, end - n - 1)), 0
        while a < d and oracle.draft_at(n + a) == oracle.reference[n + a]:
            a += 1
        rounds, accepted, n = rounds + 1, accepted + a, n + a + 1
    return rounds, accepted


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_pipelines_with_the_oracle_give_the_targets_output(tiny_dir, mode):
    target = ModelRunner(Transformer.from_hf(loading.load(tiny_dir("llama"), progress=False).hf_model), 256)
    prompt, cfg = [5, 6, 7, 8], DecodeConfig(max_new_tokens=40, draft_length=3)
    expected = autoregressive_generate(target, prompt, cfg).token_ids
    assert len(expected) == 40  # no end-of-sequence inside: every round below is counted
    for acceptance in (0.0, 0.5, 1.0):
        oracle = OracleRunner(prompt + expected, target.vocab_size, acceptance, step_cost_s=0.0, seed=2)
        result, stats = generate(target, oracle, prompt, cfg, PipelineOptions(mode=mode, lookahead=4))
        s = result.stats
        assert result.token_ids == expected, acceptance
        assert not s.drafter_lost and s.verify_rounds > 0
        if mode == "sync":  # deterministic: the verifier accepted exactly the correct prefixes
            assert (s.verify_rounds, s.accepted_tokens) == sync_rounds(oracle, len(prompt), 40, 3), acceptance
        else:  # whatever arrived: never more than the drafts that were right
            right = sum(oracle.draft_at(p) == oracle.reference[p] for p in range(len(prompt) + 1, len(prompt) + 40))
            assert s.accepted_tokens <= right, acceptance
            assert (stats["rollbacks"] == 0) is (acceptance == 1.0), (acceptance, stats["rollbacks"])
