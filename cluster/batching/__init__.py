"""Continuous batching with speculation: many requests share each target forward.

- `scheduler.py`: decides. Which waiting requests join (capacity), which prompt chunks
  prefill this step, and how deep to draft this round (measured costs, acceptance).
- `drafters.py`: which drafter (`actors/drafters/`) a loaded engine drafts with.
- `engine.py`: the loop on its own thread, speaking the `Decoder` interface
  (`cluster/decoder.py`): submit, token events, cancel. Each round is
  `decoding.round.speculative_round`; the target is `actors.verifier.TargetVerifier`.
"""
