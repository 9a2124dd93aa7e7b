"""Draft heads serving a batched verifier over the protocol: many sequences per process.

Like `actors/draft_server.py`, but each `DraftCall` carries the target's hidden state at
the sequence's newest committed token, and the answer is the heads' tree (static shape or
dynamic best-first, `HeadDrafter`) rather than a chain. The server holds no model state
per sequence: only the last tree, to learn from the next call how much of it was kept
(the calibration of the dynamic tree's confidence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.draft_server import DraftRefused, RoundServer
from actors.head_drafter import HeadDrafter, HeadProposal
from protocol import CandidateTree, DraftCall


@dataclass
class _Session:
    length: int = 0  # committed tokens the verifier has reported
    proposal: HeadProposal | None = None  # the last tree drafted, to calibrate against what was kept
    root: int = 0  # the position of that tree's root


def kept_of(proposal: HeadProposal, accepted: list[int]) -> int:
    """How many drafts of `proposal`'s tree the verifier kept: the walk from its root
    along the tokens accepted after it."""
    tree, node, kept = proposal.tree, 0, 0
    for token in accepted:
        node = next((c for c in tree.children(node) if int(tree.tokens[c]) == token), None)
        if node is None:
            break
        kept += 1
    return kept


class HeadsServer(RoundServer):
    def __init__(self, drafter: HeadDrafter):
        super().__init__()
        self.drafter = drafter
        self.sessions: dict[str, _Session] = {}

    def answer(self, calls: list[DraftCall]) -> list[CandidateTree]:
        out = []
        for call in calls:  # one small heads forward per sequence: the target's forward made the states
            if call.hidden is None:
                raise DraftRefused(f"session {call.session_id}: a heads server drafts from the target's hidden "
                                   f"state; the call carries none")
            session = self._sync(call)
            hidden = torch.as_tensor(call.hidden, dtype=torch.float32)
            p = self.drafter.propose(hidden, call.token_ids[-1], max_depth=min(call.depth, call.remaining - 1))
            session.proposal, session.root = p, session.length - 1
            out.append(CandidateTree(session_id=call.session_id, step=call.step, token_ids=p.tree.tokens.tolist(),
                                     parents=p.tree.parents.tolist(), position=session.root))
        return out

    def _sync(self, call: DraftCall) -> _Session:
        session = self.sessions.get(call.session_id)
        self.check_position(call, None if session is None else session.length)
        if session is None:
            session = self.sessions[call.session_id] = _Session()
        if session.proposal is not None:  # committed after the last tree's root: its kept drafts, then the bonus
            after = call.token_ids[max(0, session.root + 1 - call.position):]
            self.drafter.observe(session.proposal, kept_of(session.proposal, list(after[:-1])))
            session.proposal = None
        session.length = call.position + len(call.token_ids)
        return session

    def release(self, session: str) -> None:
        self.sessions.pop(session, None)
