"""The verifier's side of a request: the target commits what it agrees with.

The verifier owns the request. It talks to one drafter over a ROUTER socket:

    drafter                                  verifier
    Handshake(session)               ->
                                     <-      Handshake(answer)
                                     <-      ContextUpdate(prompt)        (drafter prefills now)
                                     <-      ContextUpdate(first token)   (after the target's prefill)
    CandidateTree(step, position)    ->
                                     <-      Verdict(accepted path, next token)
    ...                                      ...
                                     <-      Shutdown

sync: one tree per round; the drafter waits for each verdict before drafting again.
ssd: the same rounds, as the verifier sees them; the drafter drafts the next round for the
verdict's likeliest outcomes while the target verifies (`actors.ssd`).
async: the drafter streams its speculation (bounded by `lookahead`) while the target
verifies; the verifier verifies whatever has arrived (`decoding.draft_stream`).

Why async stays lossless, greedy and sampling alike: every draft the target sees was drawn
from the draft distribution q sent with it, conditioned on exactly the tokens before it,
and with the drafter's own coins. How many drafts a verify takes depends only on timing,
never on the target's coins for that verify. Rejection sampling with q (Leviathan et al.)
then yields the target's distribution for any such stopping rule. After a verify, drafts
beyond it are kept only if the token the target committed equals the drafter's own token
at that position; the drafts after it were drawn conditioned on that very token, so they
are valid proposals for the next verify. Otherwise both sides drop them (the drafter
"rolls back": it crops its KV cache to the committed length). Under greedy this is AMUSD.

If the drafter dies or goes silent, the request continues target-only: same output.
This file is that loop; the session with the drafter (bounded waits, the checks on every
tree it sends) is `actors.drafter_link`, the options both sides share
`actors.pipeline_options`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from actors.drafter_link import DrafterLink, DrafterLost, check_tree, next_tree, ready_chain
from actors.pipeline_options import Cancelled, PipelineOptions
from actors.runner import ModelRunner
from decoding.acceptance import verify_greedy, verify_sampling, verify_sampling_point_mass
from decoding.draft_stream import DraftStream
from decoding.request import (
    DecodeConfig,
    GenerationResult,
    GenerationStats,
    OutputBuffer,
    TokenSink,
    make_generator,
    next_token,
)
from decoding.sampling import logits_to_probs
from protocol import ContextUpdate, ModelFingerprint, ProtocolError, RouterChannel, Verdict

log = logging.getLogger(__name__)


def verify_request(
    runner: ModelRunner,
    router: RouterChannel,
    fingerprint: ModelFingerprint,
    session: str,
    prompt: list[int],
    cfg: DecodeConfig,
    opts: PipelineOptions,
    drafter_alive: Callable[[], bool] = lambda: True,
    cancelled: Callable[[], bool] = lambda: False,
    on_tokens: TokenSink | None = None,
) -> GenerationResult:
    stats, out, gen = GenerationStats(), OutputBuffer(cfg, on_tokens), make_generator(cfg.seed)
    start = time.perf_counter()
    link = DrafterLink(router, fingerprint, session, opts, drafter_alive, cancelled)
    runner.reset(cfg.cache_room(len(prompt), opts.lookahead))
    step = 0
    try:
        if not drafter_alive():  # none was asked (speculation off) or none is up: no warning
            raise DrafterLost("")
        link.accept()
        link.send(ContextUpdate(session_id=session, step=step, token_ids=prompt, position=0, is_prompt=True))
    except DrafterLost as exc:
        if str(exc):
            log.warning("session %s: %s; decoding with the target alone", session, exc)
        link.lost = stats.drafter_lost = True
    hidden, logits = runner.feed_hidden(prompt)
    out.extend([next_token(logits, cfg.sampling, gen)])
    stats.target_forwards = 1
    stream = DraftStream()
    try:
        link.send(ContextUpdate(session_id=session, step=step, token_ids=out.tokens[:1], position=len(prompt),
                                hidden=hidden.float() if opts.heads else None))
        while not out.done:
            if cancelled():
                raise Cancelled(session)
            committed = prompt + out.tokens
            # The async drafter never drafts the last token: the target makes it anyway.
            if link.lost or (opts.mode == "async" and out.remaining == 1):
                logits = runner.feed(runner.sync(committed[:-1]) + committed[-1:])
                out.extend([next_token(logits, cfg.sampling, gen)])
                stats.target_forwards += 1
                continue
            try:
                if opts.mode != "async":  # sync and ssd: one tree per round
                    tree, q = next_tree(link, committed, step, opts)
                else:
                    tree, q = ready_chain(link, stream, committed,
                                          min(opts.lookahead, max(1, out.remaining - 1)), opts)
                check_tree(tree, q, runner.vocab_size)
            except (DrafterLost, ProtocolError) as exc:
                log.warning("session %s: %s; finishing with the target alone", session, exc)
                link.drop(step, f"dropped: {exc}"[:200])
                stats.drafter_lost = True
                continue
            verify_start = time.perf_counter()
            states = runner.score_tree_hidden(committed, tree)
            logits = runner.model.logits(states)
            if cfg.sampling.greedy:
                verdict = verify_greedy(tree, logits)
            elif opts.heads:  # the heads' top-k: distinct, deterministic candidates
                verdict = verify_sampling_point_mass(tree, logits_to_probs(logits, cfg.sampling), gen)
            else:
                verdict = verify_sampling(tree, logits_to_probs(logits, cfg.sampling), q, gen)
            runner.commit_path(tree, verdict.accepted)
            stats.verify_s += time.perf_counter() - verify_start
            new = tree.tokens[verdict.accepted].tolist() + [verdict.next_token]
            out.extend(new)
            step += 1
            stats.target_forwards += 1
            stats.verify_rounds += 1
            stats.drafted_tokens += tree.size - 1
            stats.accepted_tokens += len(verdict.accepted)
            if opts.mode == "async":
                stream.advance(len(verdict.accepted), verdict.next_token)
            try:
                link.send(Verdict(session_id=session, step=step, accepted_path=verdict.accepted,
                                  bonus_token_id=verdict.next_token, committed_length=len(committed) + len(new),
                                  hidden=states[verdict.last_node].float() if opts.heads else None))
            except DrafterLost as exc:
                log.warning("session %s: %s; finishing with the target alone", session, exc)
                link.lost = stats.drafter_lost = True
    finally:
        link.close(step, "done")
    stats.wait_s = link.wait_s
    stats.new_tokens, stats.wall_s = len(out.tokens), time.perf_counter() - start
    return GenerationResult(out.tokens, stats)
