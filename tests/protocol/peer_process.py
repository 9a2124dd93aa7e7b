"""Verifier stand-in for the two-process test, run as a script (no test-package import needed).

Binds a RouterChannel on the endpoint given in argv[1], prints {"endpoint": ...} as one JSON
line, answers candidate trees with a deterministic verdict, and on Shutdown prints its
statistics as a JSON line and exits.
"""

import json
import sys

import numpy as np

from protocol import (
    CandidateTree,
    ChannelConfig,
    ContextUpdate,
    ModelFingerprint,
    Role,
    RouterChannel,
    Shutdown,
    Verdict,
    is_zero_copy,
    owning_frame,
)

FINGERPRINT = ModelFingerprint(vocab_size=1000, tokenizer_hash="ab" * 32)


def first_child_chain(tree: CandidateTree, max_depth: int = 3) -> list[int]:
    """Accept the chain of first children from the root, up to max_depth nodes."""
    path, node = [], 0
    while len(path) < max_depth:
        children = [child for child, parent in enumerate(tree.parents) if parent == node]
        if not children:
            break
        node = children[0]
        path.append(node)
    return path


def main() -> None:
    router = RouterChannel(sys.argv[1], config=ChannelConfig(recv_timeout_s=30, linger_s=2))
    print(json.dumps({"endpoint": router.endpoint}), flush=True)
    committed = {}
    counters = {"trees": 0, "zero_copy_tensors": 0, "copied_tensors": 0}
    done = False

    def handle(peer, message):
        nonlocal done
        if isinstance(message, ContextUpdate):
            committed[message.session_id] = message.committed_length
        elif isinstance(message, CandidateTree):
            counters["trees"] += 1
            probs = message.draft_probs
            checksum = 0
            if probs is not None:
                checksum = int(round(float(np.asarray(probs, np.float64).sum())))
                if probs.nbytes >= 64 * 1024:
                    frame = owning_frame(probs)
                    zero_copy = frame is not None and is_zero_copy(probs, frame)
                    counters["zero_copy_tensors" if zero_copy else "copied_tensors"] += 1
            path = first_child_chain(message)
            message.path_tokens(path)  # raises InvalidTree if we got the tree wrong
            length = committed.get(message.session_id, 0) + len(path) + 1
            committed[message.session_id] = length
            # A head drafter's hidden state rides along: inline (6 KB) on even steps, its own
            # frame (80 KB) on odd ones.
            hidden = np.full(20_000 if message.step % 2 else 1536, message.step, dtype=np.float32)
            return Verdict(session_id=message.session_id, step=message.step, accepted_path=path,
                           bonus_token_id=checksum % 1000, committed_length=length, hidden=hidden)
        elif isinstance(message, Shutdown):
            done = True
        return None

    router.serve(handle, role=Role.VERIFIER, fingerprint=FINGERPRINT, should_stop=lambda: done, poll_s=0.05)
    stats = router.stats
    print(json.dumps({**counters, "dropped_stale_step": stats.dropped_stale_step,
                      "dropped_unknown_session": stats.dropped_unknown_session,
                      "protocol_errors": stats.protocol_errors,
                      "messages_received": stats.messages_received}), flush=True)
    router.close()


if __name__ == "__main__":
    main()
