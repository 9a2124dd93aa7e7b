"""Which drafter a loaded engine drafts with in the batched loop: one entry per kind."""

from __future__ import annotations

from actors.drafters.draft_model import DraftModelDrafter
from actors.drafters.heads import HeadsDrafter
from actors.drafters.ngram import NgramDrafter
from actors.drafters.none import NoDrafter
from actors.drafters.self_draft import SelfDrafter
from decoding.round import Drafter


def make_drafter(engine, slots: int, max_len: int, max_draft: int) -> Drafter:
    """`engine`: a `LocalEngine`. A draft model wins over heads when both are loaded (as
    `LocalEngine.generate` chooses); neither: no drafter."""
    if engine.ngram:
        return NgramDrafter(max_draft, engine.verify_costs)
    if engine.self_draft is not None:
        return SelfDrafter(engine.target_runner.model, engine.self_draft, max_draft, engine.verify_costs)
    if engine.draft_runner is not None:
        drafter = DraftModelDrafter(engine.draft_runner.model, slots, max_len, max_draft,
                                   sparse=engine.draft_runner.attention)
        drafter.measure(engine.draft_runner, engine.verify_costs)
        return drafter
    if engine.heads is not None:
        return HeadsDrafter(engine.head_drafter(engine.cfg.tree))
    return NoDrafter()
