"""What both ends of a Ray pipeline agree on for a request: the mode (sync, async or ssd), how
far an async drafter may run ahead, and a bound on every wait; and `Cancelled`, how a
caller giving up reaches whichever loop is running. Its own module so the drafter's side
(`actors.proposing`) and the ensembles need not import the verifier's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MODES = ("sync", "async", "ssd")


@dataclass(frozen=True)
class PipelineOptions:
    mode: str = "sync"
    lookahead: int = 8  # async: most unverified drafts the drafter holds, and per verify
    handshake_timeout_s: float = 60.0  # longest wait for the drafter to join a request
    draft_timeout_s: float = 60.0  # longest silence from a drafter before going target-only
    verdict_timeout_s: float = 300.0  # drafter: longest wait for the verifier
    poll_s: float = 0.02  # how often a waiting side checks liveness and cancellation
    heads: bool = False  # the drafter is draft heads: send it the target's hidden states (sync only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"pipeline mode must be one of {MODES}, got {self.mode!r}")
        if self.heads and self.mode != "sync":
            raise ValueError("draft heads run with the sync pipeline: each tree needs the verdict's hidden state")
        if not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {self.lookahead!r}")
        for name in ("handshake_timeout_s", "draft_timeout_s", "verdict_timeout_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Cancelled(Exception):
    """The caller gave up on this request."""
