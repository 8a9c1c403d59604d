"""Dates as the platform and Customer.io write them, as Unix seconds (pure rules).

Shared by the notification parser (``indexed_at``, event times), the outbound mapping (``*_at``
and ``*_date`` attributes) and the webhook mapping (``timestamp``).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

MILLISECONDS_ABOVE: Final = 10**11
"""Unix times above this are milliseconds: as seconds it would be past the year 5000, as
milliseconds it is after March 1973, so no real value of either kind is ambiguous."""
_HULL_UTC_SUFFIX: Final = " UTC"
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` with naive times read as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _number_to_seconds(number: float) -> int | None:
    if not math.isfinite(number):
        return None
    if abs(number) > MILLISECONDS_ABOVE:
        return math.floor(number / 1000)
    return math.floor(number)


def _string_to_seconds(text: str) -> int | None:
    text = text.strip()
    if _NUMBER.match(text):
        return _number_to_seconds(int(text) if text.lstrip("+-").isdigit() else float(text))
    if text.endswith(_HULL_UTC_SUFFIX):
        text = text.removesuffix(_HULL_UTC_SUFFIX) + "+00:00"
    try:
        return to_unix_seconds(datetime.fromisoformat(text))
    except ValueError:
        return None


def to_unix_seconds(value: Any) -> int | None:
    """Unix seconds of a date, or None when ``value`` is not one.

    Accepts ISO 8601 strings (``2018-03-30T14:38:02Z``, with offsets, with fractions),
    Hull's ``2018-03-30 14:38:02 UTC``, plain dates (``2018-04-01``), ``datetime``/``date``
    objects, and numbers or numeric strings as seconds (above 10^11: milliseconds).
    Naive times are UTC; fractions of a second are floored; booleans are not dates.
    """
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return _number_to_seconds(value)
        if isinstance(value, str):
            return _string_to_seconds(value)
        if isinstance(value, datetime):
            return (as_utc(value) - EPOCH) // timedelta(seconds=1)
        if isinstance(value, date):
            return to_unix_seconds(datetime(value.year, value.month, value.day))
    except (OverflowError, ValueError):
        return None
    return None
