"""Drafters: what proposes the token trees a speculative round verifies.

Each file is one way to draft, behind the `decoding.round.Drafter` interface:
- `draft_model.py`: a small model of the same vocabulary, batched over sequences.
- `heads.py`: Medusa / Amphista heads reading the target's own hidden states.
- `self_draft.py`: the target itself, with sparse attention over its own cache.
- `ngram.py`: prompt lookup, drafts copied from earlier tokens (no model at all).
- `remote.py`, `remote_heads.py`: a draft model or heads in a Ray actor of their own.
- `none.py`: no drafting (`ar`): the round is one plain target step.
"""
