"""Pacing of Track API calls: an asyncio token bucket shared by every sending task.

Customer.io asks for no more than about 100 requests a second per workspace and answers 429
beyond that, so every request waits for a token first. The ceiling holds for all instances
together: each sending instance paces itself at its share (:func:`instance_share`), which
:mod:`connector.outbound.instances` keeps up to date while a pass runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

MIN_SHARE_PER_SECOND = 0.01
"""However many instances share the limit, each may still send one request every 100 s."""


def instance_share(total_rate: float, active_instances: int) -> float:
    """The rate of one of ``active_instances`` sending instances sharing ``total_rate``.

    Fewer than one instance counts as one (the caller itself is sending), and the share never
    falls below :data:`MIN_SHARE_PER_SECOND`, so a bucket always gets a valid rate.
    """
    return max(MIN_SHARE_PER_SECOND, total_rate / max(1, active_instances))


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
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._clock = clock
        self._sleep = sleep
        self._next_slot = clock()
        """The theoretical time at which the bucket is empty again."""
        self._set_interval(rate_per_second)

    def _set_interval(self, rate_per_second: float) -> None:
        if not rate_per_second > 0:
            raise ValueError("rate_per_second must be positive")
        self.rate_per_second = rate_per_second
        self._interval = 1.0 / rate_per_second
        # How far ahead of "now" the schedule may run before callers have to wait: the burst.
        self._tolerance = (self.capacity - 1.0) * self._interval

    def set_rate(self, rate_per_second: float) -> None:
        """Pace every later reservation at ``rate_per_second``; the burst stays ``capacity``.

        Slots already handed out keep their time, and callers are still served in order. When
        the rate drops, the backlog those slots form (the schedule ahead of now) is stretched
        to the new rate, so the next caller waits as long as if every waiting caller had been
        paced at the new rate: a cut takes effect at once, not after the queue has drained.
        A rise applies from the end of the backlog on (pulling the schedule forward would let
        new callers overtake waiting ones and exceed the new rate in a window).
        """
        old_interval = self._interval
        self._set_interval(rate_per_second)
        now = self._clock()
        if self._next_slot > now and self._interval > old_interval:
            self._next_slot = now + (self._next_slot - now) * self._interval / old_interval

    def pause(self, seconds: float) -> None:
        """Serve no later reservation before ``seconds`` from now (backpressure after a 429).

        Slots already handed out keep their time; after the pause the rate applies as before.
        """
        resume = self._clock() + seconds + self._tolerance
        self._next_slot = max(self._next_slot, resume)

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
