"""Hull-style notifications → user messages: validation, traits, merging, rejections."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.notifications.parse import (
    InvalidNotification,
    parse_notification,
    strip_traits_prefix,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
HULL = json.loads((FIXTURES / "hull_notification.json").read_text())


def test_parse_notification_accepts_hulls_own_payload():
    parsed = parse_notification(HULL)
    assert parsed.rejected == []
    (message,) = parsed.messages
    assert message.key == "5a1f00000000000000000001"
    assert message.external_id == "u-42"
    assert message.email == "ana@example.com"
    assert message.anonymous_ids == ["anon-7"]
    assert message.attributes["salesforce_lead/title"] == "CTO"
    assert "traits_salesforce_lead/title" not in message.attributes
    assert message.account == {"clearbit/name": "Acme"}
    assert message.segments == [{"id": "seg-paying", "name": "Paying customers"}]
    assert message.indexed_at == datetime(2018, 3, 30, 14, 38, 5, tzinfo=UTC)
    assert [e.event_id for e in message.events] == ["ev-1", "ev-2"]
    assert message.events[0].occurred_at == datetime(2018, 3, 30, 14, 38, 2, tzinfo=UTC)
    assert message.events[1].properties["url"] == "https://example.com/pricing"


@pytest.mark.parametrize(
    "body",
    [None, [], "text", 42, {}, {"messages": {}}, {"messages": "x"}],
)
def test_parse_notification_rejects_bodies_without_a_messages_list(body):
    with pytest.raises(InvalidNotification):
        parse_notification(body)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("not an object", "message must be an object"),
        ({}, "no 'user' object"),
        ({"user": {"first_name": "Ana"}}, "none of 'id', 'external_id' and 'email'"),
        ({"user": {"id": "u", "anonymous_ids": "a"}}, "anonymous_ids"),
        ({"user": {"id": "u"}, "account": []}, "'account' must be an object"),
        ({"user": {"id": "u"}, "events": {}}, "'events' must be a list"),
        ({"user": {"id": "u"}, "events": [{"event_id": "e"}]}, "no 'event' name"),
        ({"user": {"id": "u"}, "segments": [{"name": "no id"}]}, "every segment needs an 'id'"),
    ],
)
def test_parse_notification_rejects_bad_messages_with_their_index(message, error):
    good = {"user": {"id": "good"}}
    parsed = parse_notification({"messages": [good, message]})
    assert [m.key for m in parsed.messages] == ["good"]
    assert parsed.rejected[0]["index"] == 1
    assert error in parsed.rejected[0]["error"]


@pytest.mark.parametrize(
    "user",
    [{"external_id": "u-1"}, {"email": "a@example.com"}, {"id": "x"}],
)
def test_parse_notification_accepts_any_one_identifier(user):
    assert len(parse_notification({"messages": [{"user": user}]}).messages) == 1


def test_parse_notification_latest_indexed_at_wins_and_events_merge():
    older = {
        "user": {"id": "u", "first_name": "Old", "indexed_at": "2020-01-01T00:00:00Z"},
        "events": [{"event_id": "e1", "event": "A"}, {"event_id": "e2", "event": "B"}],
    }
    newer = {
        "user": {"id": "u", "first_name": "New", "indexed_at": "2020-01-02T00:00:00Z"},
        "events": [{"event_id": "e2", "event": "B"}, {"event_id": "e3", "event": "C"}],
    }
    for order in ([newer, older], [older, newer]):
        (message,) = parse_notification({"messages": order}).messages
        assert message.attributes["first_name"] == "New"
        assert sorted(e.event_id for e in message.events) == ["e1", "e2", "e3"]


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"traits_a": 1}, {"a": 1}),
        ({"traits_a/b": 1}, {"a/b": 1}),
        ({"a": 1, "traits_a": 2}, {"a": 1}),
        ({"traits_": 1}, {"traits_": 1}),
        ({"id": "x"}, {"id": "x"}),
    ],
)
def test_strip_traits_prefix(user, expected):
    assert strip_traits_prefix(user) == expected


def test_data_hash_changes_with_attributes_not_with_events():
    base = {"user": {"id": "u", "a": 1}}
    with_event = {"user": {"id": "u", "a": 1}, "events": [{"event_id": "e", "event": "X"}]}
    changed = {"user": {"id": "u", "a": 2}}
    (one,) = parse_notification({"messages": [base]}).messages
    (two,) = parse_notification({"messages": [with_event]}).messages
    (three,) = parse_notification({"messages": [changed]}).messages
    assert one.data_hash() == two.data_hash() != three.data_hash()


def _events(*events: dict) -> list:
    body = {"messages": [{"user": {"id": "u"}, "events": list(events)}]}
    (message,) = parse_notification(body).messages
    return message.events


def _event(**fields) -> dict:
    return {"event": "Viewed", "created_at": 1613063089, "properties": {"a": 1}, **fields}


def test_parse_event_without_event_id_gets_an_id_from_its_content():
    (event,) = (
        parse_notification({"messages": [{"user": {"id": "u"}, "events": [_event()]}]})
        .messages[0]
        .events
    )
    assert event.event_id.startswith("sha256:")
    assert len(event.event_id) == len("sha256:") + 64
    # The same content gives the same id, whatever its keys' order or the time's spelling.
    same = {"properties": {"a": 1}, "created_at": "2021-02-11T17:04:49Z", "event": "Viewed"}
    assert _events(same)[0].event_id == event.event_id
    # Anything else in it gives another.
    others = [
        _event(event="Clicked"),
        _event(created_at=1613063090),
        _event(properties={"a": 2}),
        _event(context={"ip": "1.2.3.4"}),
        {"event": "Viewed", "properties": {"a": 1}},
    ]
    assert len({e.event_id for e in _events(*others)} | {event.event_id}) == 6


def test_parse_event_without_event_id_no_longer_rejects_the_message():
    parsed = parse_notification(
        {"messages": [{"user": {"id": "u"}, "events": [_event(), _event(event_id="e1")]}]}
    )
    assert parsed.rejected == []
    assert [e.event_id[:7] for e in parsed.messages[0].events] == ["sha256:", "e1"]
