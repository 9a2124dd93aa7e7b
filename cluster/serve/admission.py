"""How many requests a replica holds, and how long a refused one should wait.

The decoder behind the replica queues and batches what it holds (`cluster/decoder.py`);
admission only bounds that: past `max_pending` requests (decoding + waiting) a request
is refused at once with a Retry-After estimated from recent service times, never left to
hang. Requests whose client went away are cancelled in the decoder and counted here.
"""

from __future__ import annotations

import math


class QueueFull(Exception):
    def __init__(self, pending: int, retry_after_s: int):
        super().__init__(f"{pending} requests already pending on this replica; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, max_pending: int, parallel: int):
        self.max_pending, self.parallel = max_pending, max(1, parallel)  # parallel: sequences decoding at once
        self.pending = 0  # admitted and not yet finished: decoding + waiting
        self.abandoned = 0  # requests stopped or skipped because their client went away
        self._service_s = 5.0  # moving average of one request's time in the replica

    def admit(self) -> None:
        if self.pending >= self.max_pending:
            raise QueueFull(self.pending, max(1, math.ceil(self._service_s * self.pending / self.parallel)))
        self.pending += 1

    def release(self, seconds: float) -> None:
        self.pending -= 1
        self._service_s = 0.8 * self._service_s + 0.2 * seconds

    def state(self) -> dict:
        return {"pending": self.pending, "max_pending": self.max_pending, "abandoned": self.abandoned}
