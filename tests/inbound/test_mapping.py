"""Customer.io reporting webhook → InboundEvent: names, properties, time, identity."""

import dataclasses
import json
import math
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.inbound.mapping import (
    _EMAIL_ADDRESS,
    Identity,
    InboundEvent,
    InvalidWebhook,
    event_name,
    event_properties,
    map_webhook,
    parse_email,
    parse_timestamp,
    resolve_identity,
    split_event_type,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _payload(**fields: Any) -> dict[str, Any]:
    return {"event_id": "01HXYZ", "timestamp": 1613063089, "data": {}, **fields}


# Every object type and metric Customer.io documents for reporting webhooks and its
# "Journeys Message Metrics" (docs.customer.io/api/webhooks, /journeys/webhooks,
# /cdp/sources/connections/cio-journeys), with the name we give it.
DOCUMENTED_METRICS = [
    ("customer", "subscribed", "Customer Subscribed"),
    ("customer", "unsubscribed", "Customer Unsubscribed"),
    (
        "customer",
        "cio_subscription_preferences_changed",
        "Customer Subscription Preferences Changed",
    ),
    ("email", "drafted", "Email Drafted"),
    ("email", "attempted", "Email Attempted"),
    ("email", "deferred", "Email Deferred"),
    ("email", "sent", "Email Sent"),
    ("email", "delivered", "Email Delivered"),
    ("email", "opened", "Email Opened"),
    ("email", "clicked", "Email Link Clicked"),
    ("email", "converted", "Email Converted"),
    ("email", "unsubscribed", "Email Unsubscribed"),
    ("email", "bounced", "Email Bounced"),
    ("email", "dropped", "Email Dropped"),
    ("email", "spammed", "Email Marked as Spam"),
    ("email", "failed", "Email Failed"),
    ("email", "undeliverable", "Email Undeliverable"),
    ("push", "drafted", "Push Drafted"),
    ("push", "attempted", "Push Attempted"),
    ("push", "sent", "Push Sent"),
    ("push", "delivered", "Push Delivered"),
    ("push", "opened", "Push Opened"),
    ("push", "clicked", "Push Link Clicked"),
    ("push", "converted", "Push Converted"),
    ("push", "bounced", "Push Bounced"),
    ("push", "dropped", "Push Dropped"),
    ("push", "failed", "Push Failed"),
    ("push", "undeliverable", "Push Undeliverable"),
    ("in_app", "drafted", "In-App Message Drafted"),
    ("in_app", "attempted", "In-App Message Attempted"),
    ("in_app", "sent", "In-App Message Sent"),
    ("in_app", "opened", "In-App Message Opened"),
    ("in_app", "clicked", "In-App Message Link Clicked"),
    ("in_app", "converted", "In-App Message Converted"),
    ("in_app", "failed", "In-App Message Failed"),
    ("sms", "drafted", "SMS Drafted"),
    ("sms", "attempted", "SMS Attempted"),
    ("sms", "sent", "SMS Sent"),
    ("sms", "delivered", "SMS Delivered"),
    ("sms", "clicked", "SMS Link Clicked"),
    ("sms", "converted", "SMS Converted"),
    ("sms", "bounced", "SMS Bounced"),
    ("sms", "failed", "SMS Failed"),
    ("whatsapp", "drafted", "WhatsApp Drafted"),
    ("whatsapp", "attempted", "WhatsApp Attempted"),
    ("whatsapp", "sent", "WhatsApp Sent"),
    ("whatsapp", "delivered", "WhatsApp Delivered"),
    ("whatsapp", "opened", "WhatsApp Opened"),
    ("whatsapp", "clicked", "WhatsApp Link Clicked"),
    ("whatsapp", "converted", "WhatsApp Converted"),
    ("whatsapp", "bounced", "WhatsApp Bounced"),
    ("whatsapp", "failed", "WhatsApp Failed"),
    ("slack", "drafted", "Slack Message Drafted"),
    ("slack", "attempted", "Slack Message Attempted"),
    ("slack", "sent", "Slack Message Sent"),
    ("slack", "clicked", "Slack Message Link Clicked"),
    ("slack", "dropped", "Slack Message Dropped"),
    ("slack", "failed", "Slack Message Failed"),
    ("webhook", "drafted", "Webhook Message Drafted"),
    ("webhook", "attempted", "Webhook Message Attempted"),
    ("webhook", "sent", "Webhook Message Sent"),
    ("webhook", "clicked", "Webhook Message Link Clicked"),
    ("webhook", "converted", "Webhook Message Converted"),
    ("webhook", "dropped", "Webhook Message Dropped"),
    ("webhook", "failed", "Webhook Message Failed"),
]


@pytest.mark.parametrize(("object_type", "metric", "expected"), DOCUMENTED_METRICS)
def test_event_name_documented_metrics(object_type, metric, expected):
    assert event_name(object_type, metric) == expected


@pytest.mark.parametrize(("object_type", "metric", "expected"), DOCUMENTED_METRICS)
def test_map_webhook_documented_metrics(object_type, metric, expected):
    event = map_webhook(_payload(object_type=object_type, metric=metric))

    assert (event.object_type, event.metric, event.name) == (object_type, metric, expected)
    assert event.metric_key == f"{object_type}:{metric}"


@pytest.mark.parametrize(("object_type", "metric", "expected"), DOCUMENTED_METRICS)
def test_map_webhook_documented_metrics_legacy_format(object_type, metric, expected):
    event_type = (
        metric if metric == "cio_subscription_preferences_changed" else f"{object_type}_{metric}"
    )
    event = map_webhook(_payload(event_type=event_type))

    assert (event.object_type, event.metric, event.name) == (object_type, metric, expected)


@pytest.mark.parametrize(
    ("object_type", "metric", "expected"),
    [
        ("fax", "sent", "Fax Sent"),
        ("in_person", "human_clicked", "In Person Human Clicked"),
        ("email", "human_clicked", "Email Human Clicked"),
        ("sms", "replied", "SMS Replied"),
        ("whatsapp", "read", "WhatsApp Read"),
        ("EMAIL", "OPENED", "Email Opened"),
        ("email", "", "Email"),
        ("", "opened", "Opened"),
        ("", "", "Customer.io Event"),
        ("__", "__", "Customer.io Event"),
    ],
)
def test_event_name_unknown_parts_are_title_cased(object_type, metric, expected):
    assert event_name(object_type, metric) == expected


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        ("email_opened", ("email", "opened")),
        ("email_link_clicked", ("email", "link_clicked")),
        ("in_app_opened", ("in_app", "opened")),
        ("in_app_clicked", ("in_app", "clicked")),
        ("customer_subscribed", ("customer", "subscribed")),
        (
            "cio_subscription_preferences_changed",
            ("customer", "cio_subscription_preferences_changed"),
        ),
        ("push_undeliverable", ("push", "undeliverable")),
        ("whatsapp_sent", ("whatsapp", "sent")),
        ("webhook_sent", ("webhook", "sent")),
        ("slack_clicked", ("slack", "clicked")),
        ("sms_bounced", ("sms", "bounced")),
        ("fax_sent", ("fax", "sent")),
        ("fax_human_clicked", ("fax", "human_clicked")),
        ("email_", ("email", "")),
        ("unsubscribed", ("", "unsubscribed")),
        ("", ("", "")),
    ],
)
def test_split_event_type(event_type, expected):
    assert split_event_type(event_type) == expected


def _expected_event(
    payload: dict[str, Any], object_type: str, metric: str, name: str, identity: Identity
) -> InboundEvent:
    data = {key: value for key, value in payload["data"].items() if key != "identifiers"}
    return InboundEvent(
        event_id=payload["event_id"],
        object_type=object_type,
        metric=metric,
        name=name,
        properties=data,
        context={
            "source": "customerio",
            "event_id": payload["event_id"],
            "object_type": object_type,
            "metric": metric,
        },
        occurred_at=datetime.fromtimestamp(payload["timestamp"], UTC),
        identity=identity,
    )


def test_map_webhook_fixture_customer_subscribed():
    payload = _fixture("customer_subscribed.json")

    event = map_webhook(payload)

    assert event == _expected_event(
        payload,
        "customer",
        "subscribed",
        "Customer Subscribed",
        Identity(customer_id="1", email="test@example.com", cio_id=None),
    )
    assert event.properties == {"customer_id": "1", "email_address": "test@example.com"}
    assert event.occurred_at == datetime(2020, 3, 26, 19, 16, 39, tzinfo=UTC)
    assert event.metric_key == "customer:subscribed"


def test_map_webhook_fixture_customer_preferences_changed():
    payload = _fixture("customer_preferences_changed.json")

    event = map_webhook(payload)

    assert "object_type" not in payload  # spelled object_type_type in this sample
    assert event.object_type == "customer"
    assert event.metric == "cio_subscription_preferences_changed"
    assert event.name == "Customer Subscription Preferences Changed"
    assert event.metric_key == "customer:cio_subscription_preferences_changed"
    assert event.properties == {
        "content": {"topics": {"topic_7": False, "topic_8": True}},
        "customer_id": "42",
        "email_address": "test@example.com",
    }
    assert event.context == {
        "source": "customerio",
        "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQM",
        "object_type": "customer",
        "metric": "cio_subscription_preferences_changed",
    }
    assert event.occurred_at == datetime(2021, 2, 11, 17, 4, 49, tzinfo=UTC)
    assert event.identity == Identity(customer_id="42", email="test@example.com", cio_id=None)


def test_map_webhook_fixture_email_clicked():
    payload = _fixture("email_clicked.json")

    event = map_webhook(payload)

    assert event == _expected_event(
        payload,
        "email",
        "clicked",
        "Email Link Clicked",
        # identifiers carry no email here: it comes from the email's recipient.
        Identity(customer_id="1", email="test@example.com", cio_id=None),
    )
    assert event.properties["href"] == "https://example.com/pricing"
    assert event.properties["machine"] is False
    assert "identifiers" not in event.properties
    assert event.occurred_at == datetime(2020, 3, 26, 20, 25, 48, tzinfo=UTC)


def test_map_webhook_fixture_email_sent():
    payload = _fixture("email_sent.json")

    event = map_webhook(payload)

    assert event == _expected_event(
        payload,
        "email",
        "sent",
        "Email Sent",
        # identifiers.id wins over data.customer_id ("0200000001"), which stays a property.
        Identity(customer_id="42", email="test@example.com", cio_id="d9c106000001"),
    )
    assert event.properties["customer_id"] == "0200000001"
    assert event.occurred_at == datetime(2021, 2, 11, 17, 4, 49, tzinfo=UTC)


def test_map_webhook_fixture_legacy_email_opened():
    payload = _fixture("legacy_email_opened.json")

    event = map_webhook(payload)

    assert event == _expected_event(
        payload,
        "email",
        "opened",
        "Email Opened",
        Identity(customer_id="5abd08c4aede0354c3000363", email="sven+dt7@example.com", cio_id=None),
    )
    assert event.properties["email_address"] == "Sven <sven+dt7@example.com>"
    assert event.metric_key == "email:opened"
    assert event.occurred_at == datetime(2018, 3, 29, 15, 57, 12, tzinfo=UTC)


def test_map_webhook_fixtures_all_covered():
    webhooks = {path.name for path in FIXTURES.glob("*.json")} - {"hull_notification.json"}
    assert webhooks == {
        "customer_preferences_changed.json",
        "customer_subscribed.json",
        "email_clicked.json",
        "email_sent.json",
        "legacy_email_opened.json",
    }


def test_map_webhook_reads_object_type_type():
    event = map_webhook(_payload(object_type_type="push", metric="opened"))

    assert (event.object_type, event.name) == ("push", "Push Opened")


def test_map_webhook_object_type_wins_over_event_type():
    event = map_webhook(_payload(object_type="sms", metric="sent", event_type="email_opened"))

    assert (event.object_type, event.metric) == ("sms", "sent")


def test_map_webhook_legacy_in_app():
    event = map_webhook(_payload(event_type="in_app_opened"))

    assert (event.object_type, event.metric, event.name) == (
        "in_app",
        "opened",
        "In-App Message Opened",
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"event_id": "e-1"},
        {"event_id": "e-1", "object_type": "hologram", "metric": "beamed"},
        {"event_id": "e-1", "object_type": 7, "metric": ["x"], "event_type": None},
        {"event_id": "e-1", "event_type": "gibberish"},
        {"event_id": "e-1", "data": None},
        {"event_id": "e-1", "data": ["not", "an", "object"]},
        {"event_id": "e-1", "data": "text"},
        {"event_id": "e-1", "data": {"identifiers": "not an object", "customer_id": {"x": 1}}},
        {"event_id": "e-1", "timestamp": "yesterday", "data": {"content": "{broken"}},
    ],
)
def test_map_webhook_never_refuses_what_it_cannot_map(payload):
    event = map_webhook(payload)

    assert event.event_id == "e-1"
    assert event.name
    assert event.context["source"] == "customerio"


def test_map_webhook_unknown_metric_is_kept():
    event = map_webhook(_payload(object_type="hologram", metric="beamed"))

    assert event.name == "Hologram Beamed"
    assert event.metric_key == "hologram:beamed"


def test_map_webhook_non_object_data_gives_no_properties_or_identity():
    event = map_webhook(_payload(object_type="email", metric="sent", data=["x"]))

    assert event.properties == {}
    assert event.identity == Identity(customer_id=None, email=None, cio_id=None)
    assert event.identity.is_empty


@pytest.mark.parametrize("payload", [None, [], ["event_id"], "event", 42, 4.2, True])
def test_map_webhook_non_object_is_invalid(payload):
    with pytest.raises(InvalidWebhook, match="not a JSON object") as raised:
        map_webhook(payload)
    assert raised.value.reason == "the body is not a JSON object"


@pytest.mark.parametrize(
    ("event_id", "reason"),
    [
        (None, "missing"),
        ("", "non-empty string"),
        ("   ", "non-empty string"),
        (True, "non-empty string"),
        (1.5, "non-empty string"),
        ({"id": 1}, "non-empty string"),
        (["e-1"], "non-empty string"),
        ("e" * 256, "longer than 255"),
    ],
)
def test_map_webhook_bad_event_id_is_invalid(event_id, reason):
    with pytest.raises(InvalidWebhook, match=reason):
        map_webhook(_payload(event_id=event_id))


def test_map_webhook_missing_event_id_is_invalid():
    payload = _payload(object_type="email", metric="sent")
    del payload["event_id"]

    with pytest.raises(InvalidWebhook, match="event_id is missing"):
        map_webhook(payload)


def test_map_webhook_integer_event_id_is_stringified():
    assert map_webhook(_payload(event_id=12345)).event_id == "12345"


def test_map_webhook_longest_event_id_is_accepted():
    assert map_webhook(_payload(event_id="e" * 255)).event_id == "e" * 255


def test_map_webhook_does_not_share_the_payload_data():
    payload = _payload(object_type="email", metric="sent", data={"subject": "hi"})

    event = map_webhook(payload)
    event.properties["subject"] = "changed"

    assert payload["data"] == {"subject": "hi"}


def test_inbound_event_is_frozen():
    event = map_webhook(_payload(object_type="email", metric="sent"))

    with pytest.raises(dataclasses.FrozenInstanceError):
        event.name = "Other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, {}),
        ({"identifiers": {"id": "1"}}, {}),
        ({"identifiers": {"id": "1"}, "subject": "Hi"}, {"subject": "Hi"}),
        (
            {"content": '{"topics": {"topic_7": false}}'},
            {"content": {"topics": {"topic_7": False}}},
        ),
        ({"content": '[1, "two"]'}, {"content": [1, "two"]}),
        ({"content": "<html>Hello</html>"}, {"content": "<html>Hello</html>"}),
        ({"content": "{not json"}, {"content": "{not json"}),
        ({"content": "42"}, {"content": "42"}),
        ({"content": "true"}, {"content": "true"}),
        ({"content": '"quoted"'}, {"content": '"quoted"'}),
        ({"content": ""}, {"content": ""}),
        ({"content": {"already": "parsed"}}, {"content": {"already": "parsed"}}),
        ({"content": None}, {"content": None}),
        ({"nested": {"identifiers": 1}}, {"nested": {"identifiers": 1}}),
    ],
)
def test_event_properties(data, expected):
    assert event_properties(data) == expected


def test_event_properties_deeply_nested_content_is_kept_as_text():
    content = "[" * 100_000 + "]" * 100_000

    assert event_properties({"content": content}) == {"content": content}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1613063089, datetime(2021, 2, 11, 17, 4, 49, tzinfo=UTC)),
        (1613063089.5, datetime(2021, 2, 11, 17, 4, 49, 500000, tzinfo=UTC)),
        ("1613063089", datetime(2021, 2, 11, 17, 4, 49, tzinfo=UTC)),
        (" 1613063089 ", datetime(2021, 2, 11, 17, 4, 49, tzinfo=UTC)),
        ("1613063089.25", datetime(2021, 2, 11, 17, 4, 49, 250000, tzinfo=UTC)),
        (1613063089123, datetime(2021, 2, 11, 17, 4, 49, 123000, tzinfo=UTC)),
        ("1613063089123", datetime(2021, 2, 11, 17, 4, 49, 123000, tzinfo=UTC)),
        (10**11, datetime.fromtimestamp(10**11, UTC)),
        (10**11 + 1, datetime(1973, 3, 3, 9, 46, 40, 1000, tzinfo=UTC)),
        (None, None),
        ("", None),
        ("yesterday", None),
        ("2021-02-11T17:04:49Z", None),
        ("-1613063089", None),
        ("1e9", None),
        ("1_613_063_089", None),
        ("nan", None),
        (True, None),
        (False, None),
        (0, None),
        (-1, None),
        (math.nan, None),
        (math.inf, None),
        (10**30, None),
        ("9" * 40, None),
        ([1613063089], None),
        ({"seconds": 1}, None),
    ],
)
def test_parse_timestamp(value, expected):
    assert parse_timestamp(value) == expected


def test_parse_timestamp_is_utc():
    parsed = parse_timestamp(1613063089)

    assert parsed is not None
    assert parsed.utcoffset() is not None
    assert parsed.utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ana@example.com", "ana@example.com"),
        ("  ana@example.com  ", "ana@example.com"),
        ("Ana <ana@example.com>", "ana@example.com"),
        ("Sven <sven+dt7@example.com>", "sven+dt7@example.com"),
        ('"Ana, B." <ana@example.com>', "ana@example.com"),
        ("<ana@example.com>", "ana@example.com"),
        ("Ana.Smith@Example.COM", "Ana.Smith@example.com"),
        ("first.last@mail.example.co.uk", "first.last@mail.example.co.uk"),
        ("ana@xn--bcher-kva.example", "ana@xn--bcher-kva.example"),
        ("ana@example.xn--p1ai", "ana@example.xn--p1ai"),
        ("+15551234567", None),
        ("15551234567", None),
        ("#general", None),
        ("@ana", None),
        ("https://example.com/hook", None),
        ("https://example.com/a@b.com", None),
        ("http://ana@example.com", None),
        ("mailto:ana@example.com", None),
        ("ana@example.com, bob@example.com", None),
        ("Ana <ana@example.com>, Bob <bob@example.com>", None),
        ("ana@example.com (Ana)", None),
        ("ana @ example.com", None),
        ("ana@localhost", None),
        ("ana@example", None),
        ("ana@-example.com", None),
        ("ana@example..com", None),
        ("ana..b@example.com", None),
        (".ana@example.com", None),
        ("a b@example.com", None),
        ('"a b"@example.com', None),
        ("ana@exa_mple.com", None),
        ("ana@@example.com", None),
        ("ana@", None),
        ("@", None),
        ("", None),
        ("<>", None),
        ("garbage", None),
        ("ana@example.com\nbcc: eve@example.com", None),
        ("a" * 65 + "@example.com", None),
        ("a@" + ("b" * 60 + ".") * 5 + "com", None),  # 310 characters
        (None, None),
        (42, None),
        (["ana@example.com"], None),
        ({"email": "ana@example.com"}, None),
    ],
)
def test_parse_email(value, expected):
    assert parse_email(value) == expected


@settings(max_examples=300, deadline=None)
@given(st.from_regex(_EMAIL_ADDRESS, fullmatch=True))
def test_parse_email_takes_a_bare_address_as_parseaddr_does(text):
    # parse_email skips parseaddr for text that is a bare address: parseaddr would give it
    # back unchanged.
    assert parseaddr(text)[1] == text
    if len(text) <= 254 and len(text.split("@")[0]) <= 64:
        local, domain = text.split("@")
        assert parse_email(text) == f"{local}@{domain.lower()}"


@pytest.mark.parametrize(
    ("object_type", "data", "expected"),
    [
        (
            "email",
            {"identifiers": {"id": "42", "email": "a@example.com", "cio_id": "c1"}},
            Identity("42", "a@example.com", "c1"),
        ),
        ("email", {"identifiers": {"id": "42"}, "customer_id": "7"}, Identity("42", None, None)),
        ("email", {"customer_id": "7"}, Identity("7", None, None)),
        ("email", {"customer_id": 7}, Identity("7", None, None)),
        ("email", {"identifiers": {"id": 42}}, Identity("42", None, None)),
        ("email", {"identifiers": {"id": ""}, "customer_id": "7"}, Identity("7", None, None)),
        ("email", {"identifiers": {"id": None}, "customer_id": "7"}, Identity("7", None, None)),
        ("email", {"customer_id": True}, Identity(None, None, None)),
        ("email", {"customer_id": 4.2}, Identity(None, None, None)),
        ("email", {"customer_id": "   "}, Identity(None, None, None)),
        ("email", {"identifiers": {"cio_id": 99}}, Identity(None, None, "99")),
        (
            "email",
            {"identifiers": {"email": "id@example.com"}, "recipient": "r@example.com"},
            Identity(None, "id@example.com", None),
        ),
        (
            "email",
            {"identifiers": {"email": "not an email"}, "recipient": "r@example.com"},
            Identity(None, "r@example.com", None),
        ),
        (
            "email",
            {"email_address": "Ana <ea@example.com>", "recipient": "r@example.com"},
            Identity(None, "ea@example.com", None),
        ),
        ("email", {"recipient": "r@Example.com"}, Identity(None, "r@example.com", None)),
        ("customer", {"email_address": "c@example.com"}, Identity(None, "c@example.com", None)),
        ("email", {"recipient": "+15551234567"}, Identity(None, None, None)),
        ("sms", {"recipient": "+15551234567"}, Identity(None, None, None)),
        ("sms", {"recipient": "r@example.com"}, Identity(None, None, None)),
        ("push", {"recipient": "device-token-abc"}, Identity(None, None, None)),
        ("push", {"email_address": "p@example.com"}, Identity(None, None, None)),
        ("slack", {"recipient": "#general"}, Identity(None, None, None)),
        ("webhook", {"recipient": "https://example.com/hook"}, Identity(None, None, None)),
        ("whatsapp", {"recipient": "+15551234567"}, Identity(None, None, None)),
        ("in_app", {"recipient": "user@example.com"}, Identity(None, None, None)),
        (
            "sms",
            {"identifiers": {"id": "5", "email": "s@example.com"}, "recipient": "+1555"},
            Identity("5", "s@example.com", None),
        ),
        ("email", {"identifiers": ["id", "1"], "customer_id": "3"}, Identity("3", None, None)),
        ("email", {}, Identity(None, None, None)),
    ],
)
def test_resolve_identity(object_type, data, expected):
    assert resolve_identity(object_type, data) == expected


def test_identity_is_empty():
    assert Identity(None, None, None).is_empty
    assert not Identity("1", None, None).is_empty
    assert not Identity(None, "a@example.com", None).is_empty
    assert not Identity(None, None, "c1").is_empty
