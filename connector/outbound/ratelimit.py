"""Pacing of Track API calls: an asyncio token bucket shared by every sending task.

Customer.io asks for no more than about 100 requests a second per workspace and answers 429
beyond that, so every request waits for a token first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """Paces callers to at most ``rate_per_second``, with a burst of at most ``capacity``.

    Implemented as a virtual-scheduling token bucket (GCRA): each caller reserves the next free
    slot synchronously, then sleeps until it. Reservations are handed out in call order, so
    concurrent waiters are served first come, first served, and nobody polls. Over any window
    of ``w`` seconds at most ``capacity + w * rate_per_second`` acquisitions complete.

    ``clock`` and ``sleep`` are injectable so the pacing can be tested without real time.
    """

    def __init__(
        self,
        rate_per_second: float,
        capacity: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ):
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.rate_per_second = rate_per_second
        self.capacity = capacity
        self._clock = clock
        self._sleep = sleep
        self._interval = 1.0 / rate_per_second
        # How far ahead of "now" the schedule may run before callers have to wait: the burst.
        self._tolerance = (capacity - 1.0) * self._interval
        self._next_slot = clock()
        """The theoretical time at which the bucket is empty again."""

    def reserve(self) -> float:
        """Take the next slot and return how many seconds to wait until it (0: go now)."""
        now = self._clock()
        slot = max(self._next_slot, now)
        self._next_slot = slot + self._interval
        wait = slot - self._tolerance - now
        # Below a nanosecond is float rounding of a slot that is due now.
        return wait if wait > 1e-9 else 0.0

    async def acquire(self) -> None:
        """Wait until this caller may send one request.

        A caller cancelled while waiting gives up its slot without handing it on, which only
        ever lowers the rate.
        """
        delay = self.reserve()
        if delay > 0:
            await self._sleep(delay)
