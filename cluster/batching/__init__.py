"""Continuous batching with speculation: many requests share each target forward.

- `sequence.py`: one request's state (its tokens, its cache slots, its random stream);
  the slot pool that owns every sequence's KV caches.
- `scheduler.py`: decides. Which waiting requests join (capacity), which prompt chunks
  prefill this step, and how far to draft this round (measured costs, acceptance).
- `runner.py`: runs. Batched prefill, batched drafting, one verify forward for every
  running sequence, per-sequence acceptance and commit.
- `engine.py`: the loop on its own thread, speaking the `Decoder` interface
  (`cluster/decoder.py`): submit, token events, cancel.
"""
