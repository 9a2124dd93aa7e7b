"""One request decodes at a time per replica; the rest wait in a bounded FIFO.

The pipelines behind a replica hold one KV cache per actor, so requests take turns (no
batching yet). Waiting is bounded by `max_pending`: past it a request is refused at
once with a Retry-After estimated from recent service times, never left to hang.
A request whose client went away is skipped when its turn comes, or stopped at its
next committed tokens if it is decoding (`Ticket.cancelled`).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, pending: int, retry_after_s: int):
        super().__init__(f"{pending} requests already pending on this replica; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ClientGone(Exception):
    """Raised inside a decode whose client disconnected: the pipeline cancels the request."""


@dataclass
class Ticket:
    admitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancelled: bool = False

    def check(self) -> None:
        if self.cancelled:
            raise ClientGone()


class Admission:
    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.pending = 0  # admitted and not yet finished: decoding + waiting
        self.running = 0
        self.abandoned = 0  # requests stopped or skipped because their client went away
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")  # FIFO, one at a time
        self._service_s = 5.0  # moving average of one request's decode time

    def admit(self) -> Ticket:
        if self.pending >= self.max_pending:
            raise QueueFull(self.pending, max(1, math.ceil(self._service_s * self.pending)))
        self.pending += 1
        return Ticket()

    async def run(self, ticket: Ticket, work: Callable[[], T]) -> T:
        """Run `work` on the decode thread when its turn comes; release the slot after."""

        def turn() -> T:
            ticket.started_at = time.monotonic()
            self.running += 1
            try:
                ticket.check()  # skipped: the client left while it waited
                return work()
            except ClientGone:
                self.abandoned += 1
                raise
            finally:
                self.running -= 1
                spent = time.monotonic() - ticket.started_at
                self._service_s = 0.8 * self._service_s + 0.2 * spent

        future = asyncio.get_running_loop().run_in_executor(self._worker, turn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            ticket.cancelled = True  # the decode thread stops at its next tokens
            raise
        finally:
            # The slot frees when the decode thread is really done with it.
            future.add_done_callback(self._release)

    def _release(self, _future: object) -> None:
        self.pending -= 1

    def state(self) -> dict:
        return {"pending": self.pending, "running": self.running, "max_pending": self.max_pending,
                "abandoned": self.abandoned}
