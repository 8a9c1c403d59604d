"""Tracked events as Segment-spec track calls."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from connector.forwarding.message import segment_track

WHEN = datetime(2021, 2, 11, 17, 4, 49, tzinfo=UTC)


def track(**overrides):
    arguments = {
        "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQJ",
        "name": "Email Sent",
        "properties": {"subject": "hi"},
        "occurred_at": WHEN,
        "customer_id": "42",
        "email": "test@example.com",
    }
    return segment_track(**{**arguments, **overrides})


def test_segment_track_carries_the_spec_fields():
    assert track(prefix="customerio:") == {
        "type": "track",
        "event": "customerio:Email Sent",
        "properties": {"subject": "hi"},
        "timestamp": "2021-02-11T17:04:49Z",
        "messageId": "01E4C4CT6YDC7Y5M7FE1GWWPQJ",
        "userId": "42",
        "context": {"integration": {"name": "customerio"}, "traits": {"email": "test@example.com"}},
    }


@pytest.mark.parametrize(
    ("customer_id", "email", "user_id", "anonymous_id"),
    [
        ("42", "a@example.com", "42", None),
        (None, "a@example.com", None, "a@example.com"),
        (None, None, None, None),
    ],
)
def test_segment_track_identifies_by_customer_id_else_email(
    customer_id, email, user_id, anonymous_id
):
    call = track(customer_id=customer_id, email=email)
    assert call.get("userId") == user_id
    assert call.get("anonymousId") == anonymous_id
    assert ("traits" in call["context"]) is bool(email)
