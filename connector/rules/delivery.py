"""Delivery outcomes and the retry policy, shared by the outbound sync and forwarding: which
answers are worth another try, how long to wait, when to stop.

Pure functions, no I/O: the sender classifies each Track API answer with
:func:`classify_status`, and whoever schedules the next attempt asks :func:`gives_up` and
:func:`backoff_delay`. A 429 is backpressure rather than a failure: the sender pauses for
:func:`throttle_pause` and the operation is sent again, up to :data:`THROTTLE_RESENDS` times
in a pass, without counting an attempt.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class SendOutcome(enum.StrEnum):
    """What one delivery (a Track API call, a forwarded batch) came to."""

    OK = "ok"
    RETRY = "retry"
    """5xx, timeout or connection error: try again later; counts as an attempt."""
    THROTTLED = "throttled"
    """429: the remote asks to slow down. Backpressure, not the operation's fault: sent again
    after a pause, never counted as an attempt."""
    FAIL = "fail"
    """Any other 4xx: trying again will not help."""
    UNAUTHORIZED = "unauthorized"
    """401: the credentials are wrong; the whole pass stops."""


TOO_MANY_REQUESTS = 429
UNAUTHORIZED = 401
THROTTLE_RESENDS = 5
"""How many times a pass sends a throttled operation again before leaving the user for later."""


def is_retryable_status(status: int) -> bool:
    """429 and every 5xx: Customer.io is busy or broken, the same call may succeed later."""
    return status == TOO_MANY_REQUESTS or 500 <= status <= 599


def classify_status(status: int) -> SendOutcome:
    """What an HTTP status means for the operation that received it.

    2xx is a success, 401 means the credentials are wrong, 429 asks to slow down, 5xx are
    worth retrying and every other status (other 4xx, but also 1xx/3xx, which the Track API
    never answers on purpose) fails the operation for good.
    """
    if 200 <= status <= 299:
        return SendOutcome.OK
    if status == UNAUTHORIZED:
        return SendOutcome.UNAUTHORIZED
    if status == TOO_MANY_REQUESTS:
        return SendOutcome.THROTTLED
    if is_retryable_status(status):
        return SendOutcome.RETRY
    return SendOutcome.FAIL


def backoff_delay(
    attempt: int,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retrying after the ``attempt``-th failure (1-based).

    Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**(attempt-1))]``,
    so that many users failing together do not come back together.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    # Above 2**64 the product is past any sensible cap; avoid building huge floats.
    ceiling = cap if attempt > 64 else min(cap, base * 2 ** (attempt - 1))
    return max(0.0, ceiling) * rand()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date), or None."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def throttle_pause(retry_after: float | None, consecutive: int, base: float, cap: float) -> float:
    """How long every request waits after a 429, the ``consecutive``-th in a row (1-based).

    ``Retry-After`` when Customer.io sent one, else ``base * 2**(consecutive-1)``; never more
    than ``cap``. No jitter: the pause holds the one shared token bucket, not many clients.
    """
    if consecutive < 1:
        raise ValueError("consecutive is 1-based")
    if retry_after is not None:
        return min(cap, retry_after)
    return min(cap, base * 2 ** min(consecutive - 1, 64))


def gives_up(attempts: int, max_attempts: int) -> bool:
    """True once ``attempts`` tries have been made and no further one is allowed."""
    return attempts >= max_attempts
