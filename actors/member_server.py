"""An ensemble member scoring for a batched leader over the protocol (CoS in actors, batched).

The leader (`actors/remote_member.py`, inside `EnsembleVerifier`) sends one `EnsembleCall`
per running sequence each round, all with the round's step and `batch`; once all are in,
the member runs every sequence's new tokens through its model in one batched forward,
each over its own KV slot, and answers each session with its logits rows (`EnsembleRows`).
A call carries only what changed since that session's last one (`position`: where its
`token_ids` start), so a rejected draft costs a crop here, not a resend of the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from actors.attention_plan import BatchItem
from actors.draft_server import DraftRefused, RoundServer
from actors.model import Transformer
from actors.verifier import SlotPool, long_tensor
from decoding.kv_cache import KVCache
from protocol import EnsembleCall, EnsembleRows


@dataclass
class _Held:
    slot: int
    cache: KVCache
    tokens: list[int] = field(default_factory=list)  # the context in the cache, in order


class MemberServer(RoundServer):
    CALL = EnsembleCall

    def __init__(self, model: Transformer, slots: int, max_len: int):
        super().__init__()
        self.model, self.max_len = model, max_len
        self.pool = SlotPool(model, slots, max_len)
        self.held: dict[str, _Held] = {}
        self.rounds = 0

    def answer(self, calls: list[EnsembleCall]) -> list[EnsembleRows]:
        start = time.perf_counter()
        items = [self._item(call) for call in calls]
        try:
            hidden = self.model.forward_batch(items)
            rows = [self.model.logits(h[-call.count:]) for h, call in zip(hidden, calls)]
        except Exception as exc:  # answered as an Error (the serve loop lives on), not a dead loop
            raise DraftRefused(f"the member's forward failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        self.rounds += 1
        return [EnsembleRows(session_id=c.session_id, step=c.step, token_ids=(), logits=r.float().contiguous(),
                             seconds=seconds) for c, r in zip(calls, rows)]

    def _item(self, call: EnsembleCall) -> BatchItem:
        """This session's part of the forward: the cache cropped to what the call keeps, then
        the tokens from there (at least the `count` whose rows are asked for)."""
        if call.kind == "draft":
            raise DraftRefused(f"session {call.session_id}: a batched member scores; the leader drafts")
        held = self.held.get(call.session_id)
        self.check_position(call, None if held is None else len(held.tokens))
        if held is None:
            if not self.pool.available:
                raise DraftRefused(f"session {call.session_id}: all {len(self.pool.caches)} slots are taken")
            held = self.held[call.session_id] = _Held(*self.pool.take())
        context = held.tokens[:call.position] + list(call.token_ids)
        if len(context) > self.max_len:
            raise DraftRefused(f"session {call.session_id}: {len(context)} tokens exceed this member's max_len "
                               f"{self.max_len}")
        keep = min(call.position, len(context) - call.count)
        held.cache.crop(keep)
        held.tokens = context
        return BatchItem(long_tensor(context[keep:]), held.cache, prefill=call.kind == "prefill")

    def release(self, session: str) -> None:
        held = self.held.pop(session, None)
        if held is not None:
            self.pool.give_back(held.slot)
