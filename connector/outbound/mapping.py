"""How platform users and events become Customer.io attributes and events (pure rules, no I/O).

Every function here is a small rule the planner composes: attribute naming and values, date
conversion, Customer.io's size limits, change detection, chunking, event ids and page views.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
from datetime import datetime, timedelta
from typing import Any, Final

from ulid import ULID

from connector.notifications.parse import PlatformEvent
from connector.outbound.operations import UserSnapshot
from connector.rules.dates import EPOCH, as_utc, to_unix_seconds
from connector.settings.model import ConnectorSettings

# Customer.io's documented Track API limits ("Invalid API Requests" in the Journeys docs):
# a request breaking one is refused with a 400, so nothing over them is ever sent.
MAX_CUSTOMER_ID_BYTES: Final = 150
MAX_ATTRIBUTE_NAME_BYTES: Final = 150
MAX_ATTRIBUTE_VALUE_BYTES: Final = 1000
MAX_ATTRIBUTES_PER_CALL: Final = 300
MAX_EVENT_NAME_BYTES: Final = 100
MAX_EVENT_DATA_BYTES: Final = 100_000

_ULID_MAX_MS: Final = 2**48 - 1

NOT_UTF8: Final = "holds text that cannot be encoded as UTF-8 (a lone surrogate)"

FIRST_CHUNK_ATTRIBUTES: Final = ("email", "created_at")
"""Attributes that always travel in the first identify call of a customer."""


class Missing(enum.Enum):
    """Type of :data:`MISSING`."""

    MISSING = "missing"


MISSING: Final = Missing.MISSING
"""What :func:`lookup` answers for an attribute the user does not have (unlike a null value)."""


@functools.lru_cache(maxsize=4096)
def attribute_name(path: str) -> str:
    """Customer.io name of a platform attribute path.

    ``id`` → ``hull_id``; a leading ``traits_`` is dropped; every ``/`` becomes ``-``;
    ``account.X`` → ``account_`` + the name of ``X`` by the same rules
    (``account.clearbit/name`` → ``account_clearbit-name``).
    """
    if path.startswith("account."):
        return "account_" + attribute_name(path.removeprefix("account."))
    if path == "id":
        return "hull_id"
    return path.removeprefix("traits_").replace("/", "-")


def _user_value(attributes: dict[str, Any], path: str) -> Any:
    stripped = path.removeprefix("traits_")
    if stripped in attributes:
        return attributes[stripped]
    return attributes.get(path, MISSING)


def lookup(user_attributes: dict[str, Any], account: dict[str, Any], path: str) -> Any:
    """Value of a ``synchronized_attributes`` path, or :data:`MISSING` when there is none.

    ``account.X`` reads ``account[X]``. Any other path reads the user's attributes, which are
    stored without the ``traits_`` prefix: the path without a leading ``traits_`` first, then
    the path as written. A present null value is returned as ``None``, not as missing.
    """
    if path.startswith("account."):
        return account.get(path.removeprefix("account."), MISSING)
    return _user_value(user_attributes, path)


def attribute_value(name: str, value: Any) -> Any:
    """The value to send for attribute ``name``.

    A name ending in ``_at`` or ``_date`` whose value parses as a date (see
    :func:`to_unix_seconds`) becomes integer Unix seconds; anything else, objects and lists
    included, is sent unchanged.
    """
    if name.endswith(("_at", "_date")):
        seconds = to_unix_seconds(value)
        if seconds is not None:
            return seconds
    return value


def byte_size(value: Any) -> int:
    """Size of ``value`` as Customer.io measures it: UTF-8 bytes of a string, else of its JSON.

    Objects and lists are measured as compact JSON; numbers, booleans and null as their JSON
    text. Text that has no UTF-8 form (a lone surrogate) raises ``UnicodeEncodeError``.
    """
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8"))
    # The JSON text of the common scalars without json.dumps (most attributes are these).
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    kind = type(value)
    if kind is int:
        return len(int.__repr__(value))
    if kind is float and math.isfinite(value):
        return len(float.__repr__(value))
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return len(text.encode("utf-8"))


def _size_error(what: str, value: Any, limit: int | None) -> str | None:
    """Why ``value`` cannot go to Customer.io: text with no UTF-8 form, or over ``limit`` bytes."""
    try:
        size = byte_size(value)
    except UnicodeEncodeError:
        # Only stored data can hold a lone surrogate (JSON allows "\ud800"); Customer.io
        # cannot take it, and measuring it must not stop the user's other attributes.
        return f"{what} {NOT_UTF8}"
    if limit is not None and size > limit:
        return f"{what} is {size} bytes, over Customer.io's {limit}-byte limit"
    return None


def attribute_error(name: str, value: Any) -> str | None:
    """Why Customer.io would refuse attribute ``name`` with ``value``, or None when it fits."""
    return _name_error(name) or _value_error(value)


@functools.lru_cache(maxsize=4096)
def _name_error(name: str) -> str | None:
    # Cached: the names come from the settings, the same for every user.
    return _size_error("name", name, MAX_ATTRIBUTE_NAME_BYTES)


_FITTING_INT: Final = 10**900
"""Integers of fewer digits than this one's fit the value limit whatever their sign."""


def _value_error(value: Any) -> str | None:
    # The commonest values fit without being measured: short ASCII text, booleans, null,
    # floats (24 characters at most, as JSON) and integers short of the limit.
    kind = type(value)
    if kind is str:
        if len(value) <= MAX_ATTRIBUTE_VALUE_BYTES and value.isascii():
            return None
    elif value is None or kind in (bool, float) or (kind is int and abs(value) < _FITTING_INT):
        return None
    return _size_error("value", value, MAX_ATTRIBUTE_VALUE_BYTES)


def customer_id_error(customer_id: str) -> str | None:
    """Why Customer.io would refuse ``customer_id``, or None when it fits."""
    return _size_error("customer id", customer_id, MAX_CUSTOMER_ID_BYTES)


def event_error(name: str, data: dict[str, Any], *, page: bool = False) -> str | None:
    """Why Customer.io would refuse an event, or None when it fits.

    The 100-byte name limit is for events; a page view's name is its URL and is not held to it
    (it must still be text with a UTF-8 form).
    """
    name_limit = None if page else MAX_EVENT_NAME_BYTES
    return _size_error("event name", name, name_limit) or _size_error(
        "event data", data, MAX_EVENT_DATA_BYTES
    )


def customer_id(user: UserSnapshot, user_id_mapping: str) -> str | None:
    """The user's Customer.io customer id: the attribute named by ``user_id_mapping``.

    A leading ``traits_`` in the mapping is ignored like in :func:`lookup`. When the mapping is
    ``external_id`` or ``email`` and the attribute is absent or null, the snapshot's field of
    that name is used. Strings and integers are accepted (integers stringified); anything else,
    and a blank string, means no customer id (None).
    """
    value = _user_value(user.attributes, user_id_mapping)
    if value is MISSING or value is None:
        value = (
            getattr(user, user_id_mapping) if user_id_mapping in {"external_id", "email"} else None
        )
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def segment_names(user: UserSnapshot) -> list[str]:
    """Names of the user's segments, sorted and without repeats, for ``hull_segments``.

    Sorted so that the same segments always give the same value and are not seen as a change.
    """
    return sorted({str(segment["name"]) for segment in user.segments if segment.get("name")})


def build_attributes(
    user: UserSnapshot, settings: ConnectorSettings
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every attribute to identify the user with, and those left out, ``{name: reason}``.

    Always ``email`` (when known), ``created_at`` (Unix seconds, when it parses),
    ``hull_segments`` (see :func:`segment_names`) and ``anonymous_id`` (the last of the user's
    anonymous ids, when there is one); then each path of ``synchronized_attributes`` the user
    has, named by :func:`attribute_name` and valued by :func:`attribute_value`. A synchronized
    attribute does not replace one of the four above. Attributes over a Customer.io limit are
    left out and reported instead. The count is not capped: :func:`chunk_attributes` splits.
    """
    candidates: dict[str, Any] = {}
    email = user.email if user.email is not None else user.attributes.get("email")
    if email is not None:
        candidates["email"] = email
    created_at = to_unix_seconds(user.attributes.get("created_at"))
    if created_at is not None:
        candidates["created_at"] = created_at
    candidates["hull_segments"] = segment_names(user)
    if user.anonymous_ids:
        candidates["anonymous_id"] = user.anonymous_ids[-1]
    for path in settings.synchronized_attributes:
        value = lookup(user.attributes, user.account, path)
        name = attribute_name(path)
        if value is not MISSING and name not in candidates:
            candidates[name] = attribute_value(name, value)

    attributes: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, value in candidates.items():
        error = attribute_error(name, value)
        if error:
            errors[name] = error
        else:
            attributes[name] = value
    return attributes, errors


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


_EXACT_TYPES: Final = frozenset({str, int, bool, type(None)})
"""Types whose values are equal exactly when their JSON texts are (not float: ``0.0 == -0.0``)."""


def _same_json(a: Any, b: Any) -> bool:
    kind = type(a)
    if kind is type(b):
        if kind in _EXACT_TYPES:
            return a == b
        if kind is float:
            # A float's JSON text is its repr (NaN and the infinities spelt otherwise).
            return float.__repr__(a) == float.__repr__(b)
    return _canonical(a) == _canonical(b)


def changed_attributes(current: dict[str, Any], sent: dict[str, Any]) -> dict[str, Any]:
    """The attributes of ``current`` that are new or differ from what was last ``sent``.

    Values are compared as JSON, so ``1`` and ``true`` differ and key order in objects does
    not matter. Attributes sent before but absent now are not reported.
    """
    return {
        name: value
        for name, value in current.items()
        if name not in sent or not _same_json(sent[name], value)
    }


def chunk_attributes(attributes: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Split ``attributes`` into identify calls of at most ``size`` attributes.

    ``email`` and ``created_at`` (when present) lead the first chunk; the rest keep their
    order. No attributes, no chunks.
    """
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    first = [name for name in FIRST_CHUNK_ATTRIBUTES if name in attributes]
    names = first + [name for name in attributes if name not in FIRST_CHUNK_ATTRIBUTES]
    return [
        {name: attributes[name] for name in names[start : start + size]}
        for start in range(0, len(names), size)
    ]


def event_ulid(event_id: str, occurred_at: datetime | None) -> str:
    """A deterministic ULID for a platform event, so Customer.io deduplicates a retried send.

    The 48-bit time part is ``occurred_at`` in Unix milliseconds (naive is UTC; None, or a time
    outside the ULID range, is clamped: None gives 0); the 80-bit rest is the first 10 bytes of
    SHA-256 of ``event_id``.
    """
    milliseconds = 0
    if occurred_at is not None:
        milliseconds = (as_utc(occurred_at) - EPOCH) // timedelta(milliseconds=1)
    milliseconds = min(max(milliseconds, 0), _ULID_MAX_MS)
    # surrogatepass: an id stored with a lone surrogate still gets its (stable) ULID.
    randomness = hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).digest()[:10]
    return str(ULID.from_bytes(milliseconds.to_bytes(6, "big") + randomness))


def event_timestamp(occurred_at: datetime | None) -> int | None:
    """Unix seconds of the event's time (naive is UTC), or None when it has none."""
    return None if occurred_at is None else to_unix_seconds(occurred_at)


def _present(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def page_view(event: PlatformEvent) -> tuple[str | None, dict[str, Any]]:
    """Name and data of a page view.

    The name is ``properties.url``, else ``context.page_url``; None when neither is a
    non-blank string (the event cannot be sent). The data is the properties with
    ``referrer`` = ``properties.referrer``, else ``context.referrer_url``, when either is set.
    """
    properties, context = event.properties, event.context
    name = next(
        (url for url in (properties.get("url"), context.get("page_url")) if _present(url)), None
    )
    data = dict(properties)
    for referrer in (properties.get("referrer"), context.get("referrer_url")):
        if _present(referrer):
            data["referrer"] = referrer
            break
    return name, data


def is_from_customerio(event: PlatformEvent) -> bool:
    """Whether the event came from Customer.io (context ``source: customerio``).

    Such events are never sent back, or they would loop between the two systems.
    """
    source = event.context.get("source")
    return isinstance(source, str) and source.strip().lower() == "customerio"
