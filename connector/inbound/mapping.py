"""Turning one Customer.io reporting webhook into an :class:`InboundEvent` (pure, no I/O).

Two payload shapes arrive (one event per request):

* reporting webhooks: ``{"event_id", "object_type", "metric", "timestamp", "data": {...}}``;
  some senders spell ``object_type`` as ``object_type_type``, read the same way;
* the older email-activity webhooks: ``{"event_id", "event_type", "timestamp", "data"}`` where
  ``event_type`` is ``<object_type>_<metric>`` (``email_opened``, ``customer_subscribed``) or,
  for preference-centre changes, the bare ``cio_subscription_preferences_changed``.

Only ``event_id`` is required: it is what makes a retried delivery a duplicate, so without it
the payload is refused with :class:`InvalidWebhook`. Everything else is mapped as well as it
can be and never refused, because Customer.io holds back every later webhook for an hour after
any non-2xx reply: an unknown object type or metric gets a title-cased name, a missing or
unreadable ``timestamp`` gives ``occurred_at=None`` (the caller then uses the arrival time),
and a ``data`` that is not an object gives no properties and no identity (the raw body is kept
in the inbox).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

from connector.rules.dates import EPOCH, MILLISECONDS_ABOVE

SOURCE = "customerio"
"""``context.source`` of every inbound event."""

OBJECT_NAMES = {
    "customer": "Customer",
    "email": "Email",
    "push": "Push",
    "in_app": "In-App Message",
    "sms": "SMS",
    "whatsapp": "WhatsApp",
    "slack": "Slack Message",
    "webhook": "Webhook Message",
}
"""Display names of Customer.io's object types; any other type is title-cased."""

METRIC_NAMES = {
    "clicked": "Link Clicked",
    "spammed": "Marked as Spam",
    "cio_subscription_preferences_changed": "Subscription Preferences Changed",
}
"""Metrics whose display name is not simply the metric title-cased."""

EMAIL_FALLBACK_OBJECT_TYPES = frozenset({"email", "customer"})
"""Object types whose ``email_address``/``recipient`` is an email address; for the other
channels ``recipient`` is a phone number, a device token, a Slack channel or a URL."""

MAX_EVENT_ID_LENGTH = 255
"""Longest ``event_id`` the inbox can store for de-duplication."""
# Widths of the tracked_events columns; longer values are cut, never refused.
MAX_OBJECT_TYPE_LENGTH = 50
MAX_METRIC_LENGTH = 100
MAX_NAME_LENGTH = 255
MAX_IDENTIFIER_LENGTH = 255
"""Customer.io's own ids stay under 150 bytes: a longer "id" is not one."""

# Legacy event types without an object prefix, and the object type they belong to.
_LEGACY_BARE_EVENT_TYPES = {"cio_subscription_preferences_changed": "customer"}

_NUMERIC_STRING = re.compile(r"[0-9]+(?:\.[0-9]+)?")

# ASCII dot-atoms on both sides, without "/" and "?" in the local part (allowed by RFC 5322
# but in practice only ever seen in URLs), and a domain with a real top-level label.
_ATEXT = r"[A-Za-z0-9!#$%&'*+=^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = r"(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})"
_EMAIL_ADDRESS = re.compile(
    rf"(?P<local>{_ATEXT}(?:\.{_ATEXT})*)@(?P<domain>(?:{_LABEL}\.)+{_TOP_LABEL})"
)
_MAX_EMAIL_LENGTH = 254
_MAX_LOCAL_PART_LENGTH = 64


class InvalidWebhook(ValueError):
    """The payload cannot be stored as an event at all (the caller answers ``400``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Who an inbound event is about, as far as the payload says."""

    customer_id: str | None
    email: str | None
    cio_id: str | None

    @property
    def is_empty(self) -> bool:
        """Nothing to find or create a user by: the event is kept as unmatched."""
        return self.customer_id is None and self.email is None and self.cio_id is None


@dataclass(frozen=True)
class InboundEvent:
    """One Customer.io reporting webhook, ready to be tracked on a user."""

    event_id: str
    object_type: str
    """Customer.io's object type as sent (``email``, ``in_app``, ...); ``""`` if none was."""
    metric: str
    """Customer.io's metric as sent (``delivered``, ``clicked``, ...); ``""`` if none was."""
    name: str
    properties: dict[str, Any]
    """Every field of ``data`` but ``identifiers``; a JSON ``content`` string is parsed."""
    context: dict[str, Any]
    occurred_at: datetime | None
    """When it happened (UTC), from the payload's ``timestamp``; ``None`` if unreadable."""
    identity: Identity

    @property
    def metric_key(self) -> str:
        """``object_type:metric``, as listed in the ``incoming_metrics`` setting."""
        return f"{self.object_type}:{self.metric}"


def map_webhook(payload: Any) -> InboundEvent:
    """Map one parsed webhook body; raise :class:`InvalidWebhook` only for a missing event id."""
    if not isinstance(payload, dict):
        raise InvalidWebhook("the body is not a JSON object")
    event_id = _event_id(payload.get("event_id"))
    object_type, metric = _object_type_and_metric(payload)
    object_type, metric = object_type[:MAX_OBJECT_TYPE_LENGTH], metric[:MAX_METRIC_LENGTH]
    data = payload.get("data")
    if not isinstance(data, dict):
        data = {}
    return InboundEvent(
        event_id=event_id,
        object_type=object_type,
        metric=metric,
        name=event_name(object_type, metric)[:MAX_NAME_LENGTH],
        properties=event_properties(data),
        context={
            "source": SOURCE,
            "event_id": event_id,
            "object_type": object_type,
            "metric": metric,
        },
        occurred_at=parse_timestamp(payload.get("timestamp")),
        identity=resolve_identity(object_type, data),
    )


def event_name(object_type: str, metric: str) -> str:
    """``<Object> <Metric>``: ``("email", "clicked")`` → ``"Email Link Clicked"``."""
    object_name = OBJECT_NAMES.get(object_type) or _title(object_type)
    metric_name = METRIC_NAMES.get(metric) or _title(metric)
    return " ".join(part for part in (object_name, metric_name) if part) or "Customer.io Event"


def split_event_type(event_type: str) -> tuple[str, str]:
    """A legacy ``event_type`` as ``(object_type, metric)``.

    The object type is the longest known one followed by ``_`` (``in_app_opened`` →
    ``("in_app", "opened")``); failing that, the text before the first ``_``; a type without
    any ``_`` is taken as a bare metric.
    """
    if event_type in _LEGACY_BARE_EVENT_TYPES:
        return _LEGACY_BARE_EVENT_TYPES[event_type], event_type
    for object_type in sorted(OBJECT_NAMES, key=len, reverse=True):
        prefix = f"{object_type}_"
        if event_type.startswith(prefix) and len(event_type) > len(prefix):
            return object_type, event_type[len(prefix) :]
    head, separator, tail = event_type.partition("_")
    return (head, tail) if separator else ("", event_type)


def event_properties(data: dict[str, Any]) -> dict[str, Any]:
    """Every field of ``data`` but ``identifiers``, with a JSON ``content`` string parsed.

    Only a JSON object or array is taken from ``content``: a message body that happens to read
    ``42`` or ``true`` stays the text it was.
    """
    properties = {key: value for key, value in data.items() if key != "identifiers"}
    content = properties.get("content")
    if isinstance(content, str):
        try:
            parsed = json.loads(content)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict | list):
            properties["content"] = parsed
    return properties


def parse_timestamp(value: Any) -> datetime | None:
    """A Unix time (seconds or milliseconds; number or numeric string) as an aware UTC datetime.

    ``None`` for anything else: missing, negative or zero, not a number, or out of range.
    """
    number: int | float
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str) and _NUMERIC_STRING.fullmatch(value.strip()):
        text = value.strip()
        number = float(text) if "." in text else int(text)
    else:
        return None
    if not number > 0:  # also rejects NaN
        return None
    try:
        if number > MILLISECONDS_ABOVE:
            return EPOCH + timedelta(milliseconds=number)
        return EPOCH + timedelta(seconds=number)
    except OverflowError:
        return None


def resolve_identity(object_type: str, data: dict[str, Any]) -> Identity:
    """Customer id, email and ``cio_id`` from a webhook's ``data``.

    The customer id is ``identifiers.id``, else ``customer_id``; the email is
    ``identifiers.email``, else (only for ``email`` and ``customer`` objects) ``email_address``
    or ``recipient``, each kept only if it is an email address (see :func:`parse_email`).
    """
    identifiers = data.get("identifiers")
    if not isinstance(identifiers, dict):
        identifiers = {}
    customer_id = _identifier(identifiers.get("id")) or _identifier(data.get("customer_id"))
    email = parse_email(identifiers.get("email"))
    if email is None and object_type in EMAIL_FALLBACK_OBJECT_TYPES:
        email = parse_email(data.get("email_address")) or parse_email(data.get("recipient"))
    return Identity(
        customer_id=customer_id, email=email, cio_id=_identifier(identifiers.get("cio_id"))
    )


def parse_email(value: Any) -> str | None:
    """The address in ``value`` (``"Ana <ana@Example.com>"`` → ``"ana@example.com"``) or ``None``.

    Accepted: a bare address, or a display name followed by ``<address>``. Anything else (a
    phone number, a Slack channel, a URL, ``mailto:``, a list of addresses, a comment) is
    ``None`` rather than a guess. The domain is lowercased, being case-insensitive; the local
    part keeps its case, which its mail server may treat as significant.
    """
    if not isinstance(value, str):
        return None
    text = address = value.strip()
    # Nearly always a bare address, which parseaddr would give back as it is: it costs the
    # processor some 40 µs a webhook, the pattern one.
    match = _EMAIL_ADDRESS.fullmatch(text)
    if match is None:
        _, address = parseaddr(text)
        # parseaddr is lenient: it takes "mailto:" for a group name and the first of a list,
        # so the address must be all of the text or its final "<...>".
        if not address or not (text == address or text.endswith(f"<{address}>")):
            return None
        match = _EMAIL_ADDRESS.fullmatch(address)
    if (
        match is None
        or len(address) > _MAX_EMAIL_LENGTH
        or len(match["local"]) > _MAX_LOCAL_PART_LENGTH
    ):
        return None
    return f"{match['local']}@{match['domain'].lower()}"


def _event_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        raise InvalidWebhook("event_id is missing")
    if not isinstance(value, str) or not value.strip():
        raise InvalidWebhook("event_id must be a non-empty string")
    if len(value) > MAX_EVENT_ID_LENGTH:
        raise InvalidWebhook(f"event_id is longer than {MAX_EVENT_ID_LENGTH} characters")
    return value


def _object_type_and_metric(payload: dict[str, Any]) -> tuple[str, str]:
    object_type = _word(payload.get("object_type")) or _word(payload.get("object_type_type"))
    metric = _word(payload.get("metric"))
    if object_type and metric:
        return object_type, metric
    legacy_object_type, legacy_metric = split_event_type(_word(payload.get("event_type")))
    return object_type or legacy_object_type, metric or legacy_metric


def _word(value: Any) -> str:
    return value.strip().lower() if isinstance(value, str) else ""


def _identifier(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= MAX_IDENTIFIER_LENGTH:
        return value
    return None


def _title(code: str) -> str:
    return " ".join(word.capitalize() for word in code.replace("_", " ").split())


KNOWN_METRICS = (
    "drafted",
    "attempted",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "converted",
    "bounced",
    "dropped",
    "deferred",
    "spammed",
    "failed",
    "undeliverable",
    "subscribed",
    "unsubscribed",
    "cio_subscription_preferences_changed",
)
"""The metrics of Customer.io's reporting webhooks, over all channels."""

KNOWN_EVENT_NAMES = frozenset(
    event_name(object_type, metric) for object_type in OBJECT_NAMES for metric in KNOWN_METRICS
)
"""The ``event`` label values of ``connector_webhooks``: each known object type with each
known metric.

Webhook payloads are written by whoever holds the URL; every distinct label value is a time
series kept in memory until the process ends, so anything else is counted as
:data:`OTHER_EVENT`."""

OTHER_EVENT = "other"


def webhook_event_label(name: str) -> str:
    """``name`` if it is a known event name (or ``""``: no event), else ``"other"``."""
    return name if not name or name in KNOWN_EVENT_NAMES else OTHER_EVENT
