"""Hull-style notification bodies → validated user messages (pure: no I/O).

A body written by Hull itself is accepted as it is; only what the connector needs is checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from connector.rules import safe_json
from connector.rules.dates import to_unix_seconds
from connector.rules.traits import unprefixed

# The widths of the columns these are stored in (users.id, users.email, user_events.*).
MAX_ID_LENGTH = 255
MAX_EMAIL_LENGTH = 320


class InvalidNotification(ValueError):
    """The body as a whole is unusable (the reply is 400)."""


@dataclass(frozen=True)
class PlatformEvent:
    """An event the platform sent for a user: as parsed, as stored, and as the outbound sync
    reads it back."""

    event_id: str
    name: str
    properties: dict[str, Any]
    context: dict[str, Any]
    occurred_at: datetime | None


@dataclass
class UserMessage:
    """One user of a notification, ready to store."""

    key: str | None
    """``user.id``; None when only ``external_id`` or ``email`` identify the user."""
    external_id: str | None
    email: str | None
    anonymous_ids: list[str]
    attributes: dict[str, Any]
    account: dict[str, Any]
    segments: list[dict[str, Any]]
    indexed_at: datetime | None
    events: list[PlatformEvent] = field(default_factory=list)
    index: int = 0
    """Position of the (first) message in the notification, for error reports."""

    @property
    def identity(self) -> tuple[str, str]:
        """What several messages about one user have in common."""
        if self.key:
            return ("id", self.key)
        if self.external_id:
            return ("external_id", self.external_id)
        return ("email", self.email or "")

    def data_hash(self) -> str:
        """Fingerprint of everything but the events, to tell whether the user changed."""
        document = [self.attributes, self.account, self.segments, self.anonymous_ids]
        encoded = json.dumps(document, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()


@dataclass
class ParsedNotification:
    messages: list[UserMessage]
    rejected: list[dict[str, Any]]


def _datetime(value: Any, field_name: str) -> datetime | None:
    seconds = to_unix_seconds(value)
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"'{field_name}' is not a date between the years 1 and 9999") from None


def _bounded(value: str | None, field_name: str, limit: int = MAX_ID_LENGTH) -> str | None:
    if value is not None and len(value) > limit:
        raise ValueError(f"'{field_name}' is longer than {limit} characters")
    return value


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float | str):
        text = str(value).strip()
        return text or None
    return None


def strip_traits_prefix(user: dict[str, Any]) -> dict[str, Any]:
    """Platform trait keys lose their ``traits_`` prefix; a plain key wins over a prefixed one."""
    out: dict[str, Any] = {}
    for key, value in user.items():
        if unprefixed(key) != key:
            out.setdefault(unprefixed(key), value)
        else:
            out[key] = value
    return out


def _parse_event(raw: Any, position: int) -> PlatformEvent:
    if not isinstance(raw, dict):
        raise ValueError(f"events[{position}] must be an object")
    name = _bounded(_text(raw.get("event")), f"events[{position}].event")
    if not name:
        raise ValueError(f"events[{position}] has no 'event' name")
    properties = raw.get("properties") or {}
    context = raw.get("context") or {}
    if not isinstance(properties, dict) or not isinstance(context, dict):
        raise ValueError(f"events[{position}] properties and context must be objects")
    occurred_at = _datetime(raw.get("created_at"), f"events[{position}].created_at")
    event_id = _text(raw.get("event_id")) or _text(raw.get("id"))
    if event_id is None:
        event_id = content_event_id(name, occurred_at, properties, context)
    _bounded(event_id, f"events[{position}].event_id")
    return PlatformEvent(
        event_id=event_id,
        name=name,
        properties=properties,
        context=context,
        occurred_at=occurred_at,
    )


def content_event_id(
    name: str,
    occurred_at: datetime | None,
    properties: dict[str, Any],
    context: dict[str, Any],
) -> str:
    """The id of an event the platform sent without ``event_id``: ``sha256:`` and the hash
    of its canonical JSON (name, time, properties, context), so that the same event sent again
    gets the same id (and is stored, and sent to Customer.io, once)."""
    document = {
        "name": name,
        "created_at": occurred_at.isoformat() if occurred_at else None,
        "properties": properties,
        "context": context,
    }
    encoded = json.dumps(
        document, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False
    )
    return "sha256:" + hashlib.sha256(encoded.encode()).hexdigest()


def _segments(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("'segments' must be a list")
    segments = []
    for item in raw:
        if isinstance(item, dict) and _text(item.get("id")):
            name = item.get("name")
            if name is not None and not isinstance(name, str):
                raise ValueError("a segment's 'name' must be text")
            segments.append({"id": str(item["id"]), "name": name or str(item["id"])})
        elif isinstance(item, str) and item:
            segments.append({"id": item, "name": item})
        else:
            raise ValueError("every segment needs an 'id'")
    return segments


def _unstorable_text(raw: dict[str, Any]) -> str | None:
    """:func:`safe_json.unstorable_text` of a message, which is walked (building the path of
    every value) only when its JSON text holds something that may be unstorable: encoding it
    is one call into C. ``json`` writes NUL as ``\\u0000`` and a lone surrogate as it is."""
    try:
        encoded = json.dumps(raw, ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # not from JSON (an integer past str()'s limit, say)
        encoded = "\\u0000"
    if "\\u0000" not in encoded and safe_json.is_storable(encoded):
        return None
    return safe_json.unstorable_text(raw)


def parse_message(raw: Any, index: int) -> UserMessage:
    """Validate one message; raises ``ValueError`` with a reason the platform can act on."""
    if not isinstance(raw, dict):
        raise ValueError("message must be an object")
    unstorable = _unstorable_text(raw)
    if unstorable:
        raise ValueError(unstorable)
    user = raw.get("user")
    if not isinstance(user, dict):
        raise ValueError("message has no 'user' object")
    key = _bounded(_text(user.get("id")), "user.id")
    external_id = _bounded(_text(user.get("external_id")), "user.external_id")
    email = _bounded(_text(user.get("email")), "user.email", MAX_EMAIL_LENGTH)
    if not (key or external_id or email):
        raise ValueError("user has none of 'id', 'external_id' and 'email'")
    anonymous_ids = user.get("anonymous_ids") or []
    if not isinstance(anonymous_ids, list):
        raise ValueError("'user.anonymous_ids' must be a list")
    account = raw.get("account")
    account = {} if account is None else account
    if not isinstance(account, dict):
        raise ValueError("'account' must be an object")
    events_raw = raw.get("events")
    events_raw = [] if events_raw is None else events_raw
    if not isinstance(events_raw, list):
        raise ValueError("'events' must be a list")
    segments = raw.get("segments")
    if segments is None and isinstance(user.get("segment_ids"), list):
        segments = user["segment_ids"]
    return UserMessage(
        key=key,
        external_id=external_id,
        email=email,
        anonymous_ids=[str(a) for a in anonymous_ids if _text(a)],
        attributes=strip_traits_prefix(user),
        account=account,
        segments=_segments(segments),
        indexed_at=_datetime(user.get("indexed_at"), "user.indexed_at"),
        events=[_parse_event(event, i) for i, event in enumerate(events_raw)],
        index=index,
    )


def _merge(winner: UserMessage, other: UserMessage) -> UserMessage:
    """Keep the later message's data, and the events of both (by ``event_id``)."""
    newer, older = winner, other
    if (other.indexed_at or datetime.min.replace(tzinfo=UTC)) > (
        winner.indexed_at or datetime.min.replace(tzinfo=UTC)
    ):
        newer, older = other, winner
    events = {event.event_id: event for event in older.events}
    events.update({event.event_id: event for event in newer.events})
    newer.events = list(events.values())
    newer.index = min(winner.index, other.index)
    return newer


def parse_notification(body: Any) -> ParsedNotification:
    """Split a notification into usable user messages and per-message rejections.

    Raises ``InvalidNotification`` when the body is not an object with a ``messages`` list.
    """
    if not isinstance(body, dict):
        raise InvalidNotification("body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidNotification("body must have a 'messages' list")
    by_user: dict[tuple[str, str], UserMessage] = {}
    rejected: list[dict[str, Any]] = []
    for index, raw in enumerate(messages):
        try:
            message = parse_message(raw, index)
        except ValueError as exc:
            rejected.append({"index": index, "error": str(exc)})
            continue
        previous = by_user.get(message.identity)
        by_user[message.identity] = _merge(previous, message) if previous else message
    return ParsedNotification(messages=list(by_user.values()), rejected=rejected)
