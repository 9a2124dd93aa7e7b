"""Draft heads in another process (a Ray actor, `actors/heads_server.py`), over the protocol.

The link is the remote draft model's (`remote.py`): one `DraftCall` per drafting sequence
a round, one `CandidateTree` back. Each call also carries the target's hidden state at
the sequence's newest committed token (a tensor frame of hidden_size floats), which the
verify that committed it produced, and the answer is the heads' tree. How deep to draft
is weighed as for heads in-process (`heads.py`), with the round trip as the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.drafters.heads import EMA
from actors.drafters.remote import RemoteDrafter, RemoteState
from decoding.acceptance import Verdict
from decoding.round import Draft
from decoding.sequence import Sequence
from decoding.tree import TokenTree
from protocol import CandidateTree


@dataclass
class RemoteHeadsState(RemoteState):
    hidden: torch.Tensor | None = None  # the target's state at the newest committed token [d]
    accepted: float = 1.0  # decayed mean drafts accepted per round
    size: float = 8.0  # decayed mean tree nodes verified per round


class RemoteHeadsDrafter(RemoteDrafter):
    def __init__(self, *args, n_heads: int, max_nodes: int, **kwargs):
        """`n_heads`: the deepest tree the heads draft; `max_nodes`: the most drafts in a tree."""
        super().__init__(*args, **kwargs)
        self.n_heads = n_heads
        self.tree_room = max_nodes + 1  # and the root
        self.propose_s = 0.0  # decayed mean seconds per sequence, round trip included

    def _state(self, hidden: torch.Tensor) -> RemoteHeadsState:
        return RemoteHeadsState(hidden=hidden)

    def _hidden(self, seq: Sequence) -> torch.Tensor:
        return seq.draft.hidden.detach().float().contiguous()

    def _draft(self, tree: CandidateTree) -> Draft:
        return Draft(TokenTree(torch.tensor(tree.token_ids), torch.tensor(tree.parents)))

    def _observe_cost(self, elapsed: float, drafts: dict[str, Draft], n: int, alone: bool) -> None:
        took = elapsed / n
        self.propose_s = EMA * self.propose_s + (1 - EMA) * took if self.propose_s else took

    def observe(self, seq: Sequence, draft: Draft | None, verdict: Verdict, hidden: torch.Tensor) -> None:
        st = seq.draft
        st.hidden = hidden
        if draft is not None:
            st.accepted = EMA * st.accepted + (1 - EMA) * len(verdict.accepted)
            st.size = EMA * st.size + (1 - EMA) * draft.tree.size

    def estimate(self, seqs: list[Sequence], k: int) -> tuple[float, float, int]:
        tokens = sum(1 + s.draft.accepted for s in seqs)
        rows = sum(max(2, round(s.draft.size)) for s in seqs)
        return tokens, self.propose_s * len(seqs), rows

    def depths(self, max_draft: int) -> list[int]:
        self._resume()
        return [] if self.lost else [min(max_draft, self.n_heads)]
