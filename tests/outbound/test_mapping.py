import hashlib
import json
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from ulid import ULID

from connector.notifications.parse import PlatformEvent
from connector.outbound import mapping
from connector.outbound.operations import UserSnapshot
from connector.settings.model import ConnectorSettings

HULL_TIME = 1522420682  # 2018-03-30T14:38:02Z


def make_user(**overrides: Any) -> UserSnapshot:
    values: dict[str, Any] = {
        "id": "u1",
        "external_id": "ext-1",
        "email": "ana@example.com",
        "anonymous_ids": (),
        "attributes": {},
        "account": {},
        "segments": (),
    }
    values.update(overrides)
    return UserSnapshot(**values)


def make_event(
    properties: dict[str, Any] | None = None, context: dict[str, Any] | None = None
) -> PlatformEvent:
    return PlatformEvent(
        event_id="ev-1",
        name="page",
        properties=properties or {},
        context=context or {},
        occurred_at=None,
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("id", "hull_id"),
        ("first_name", "first_name"),
        ("traits_plan", "plan"),
        ("traits_salesforce_lead/title", "salesforce_lead-title"),
        ("clearbit/company/name", "clearbit-company-name"),
        ("my_traits_x", "my_traits_x"),
        ("account.name", "account_name"),
        ("account.clearbit/name", "account_clearbit-name"),
        ("account.traits_tier", "account_tier"),
        ("account.id", "account_hull_id"),
        ("user_id", "user_id"),
    ],
)
def test_attribute_name_follows_customerio_naming(path: str, expected: str) -> None:
    assert mapping.attribute_name(path) == expected


@pytest.mark.parametrize(
    ("attributes", "account", "path", "expected"),
    [
        ({"plan": "pro"}, {}, "plan", "pro"),
        ({"plan": "pro"}, {}, "traits_plan", "pro"),
        ({"traits_plan": "literal"}, {}, "traits_plan", "literal"),
        ({"plan": "stripped", "traits_plan": "literal"}, {}, "traits_plan", "stripped"),
        ({"plan": None}, {}, "plan", None),
        ({}, {"clearbit/name": "Acme"}, "account.clearbit/name", "Acme"),
        ({}, {"size": None}, "account.size", None),
        ({"account.size": 5}, {}, "account.size", mapping.MISSING),
        ({}, {}, "plan", mapping.MISSING),
        ({}, {"plan": "pro"}, "plan", mapping.MISSING),
    ],
)
def test_lookup_reads_user_or_account_and_tells_missing_from_null(
    attributes: dict[str, Any], account: dict[str, Any], path: str, expected: Any
) -> None:
    assert mapping.lookup(attributes, account, path) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2018-03-30T14:38:02Z", HULL_TIME),
        ("2018-03-30T14:38:02+00:00", HULL_TIME),
        ("2018-03-30T16:38:02+02:00", HULL_TIME),
        ("2018-03-30T14:38:02.987Z", HULL_TIME),
        ("2018-03-30T14:38:02.123456789Z", HULL_TIME),
        ("2018-03-30T14:38:02", HULL_TIME),
        ("2018-03-30 14:38:02 UTC", HULL_TIME),
        ("2018-04-01", 1522540800),
        (" 2018-04-01 ", 1522540800),
        (HULL_TIME, HULL_TIME),
        (1522420682.75, HULL_TIME),
        (1522420682123, HULL_TIME),
        (1522420682123.4, HULL_TIME),
        (10**11, 10**11),
        (10**11 + 1000, 100_000_001),
        ("1522420682", HULL_TIME),
        ("1522420682123", HULL_TIME),
        ("1522420682.5", HULL_TIME),
        (0, 0),
        (datetime(2018, 3, 30, 14, 38, 2), HULL_TIME),
        (datetime(2018, 3, 30, 16, 38, 2, tzinfo=timezone(timedelta(hours=2))), HULL_TIME),
        (date(2018, 4, 1), 1522540800),
        ("not a date", None),
        ("", None),
        ("2018-13-45", None),
        (None, None),
        (True, None),
        (float("nan"), None),
        (float("inf"), None),
        ({"at": 1}, None),
        ([HULL_TIME], None),
        (10**400, None),
    ],
)
def test_to_unix_seconds_parses_dates(value: Any, expected: int | None) -> None:
    assert mapping.to_unix_seconds(value) == expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("created_at", "2018-03-30T14:38:02Z", HULL_TIME),
        ("plan_started_at", "2018-03-30 14:38:02 UTC", HULL_TIME),
        ("renewal_date", "2018-04-01", 1522540800),
        ("last_seen_at", 1522420682123, HULL_TIME),
        ("signed_up_at", "soon", "soon"),
        ("signed_up_at", None, None),
        ("signed_up_at", True, True),
        ("started", "2018-03-30T14:38:02Z", "2018-03-30T14:38:02Z"),
        ("format", "2018-04-01", "2018-04-01"),
        ("tags", ["a", "b"], ["a", "b"]),
        ("address", {"city": "Lyon"}, {"city": "Lyon"}),
        ("score", 1522420682123, 1522420682123),
    ],
)
def test_attribute_value_converts_dates_only_for_date_names(
    name: str, value: Any, expected: Any
) -> None:
    assert mapping.attribute_value(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("plan", "x" * 1000, None),
        ("plan", "x" * 1001, "value is 1001 bytes, over Customer.io's 1000-byte limit"),
        ("plan", "é" * 500, None),
        ("plan", "é" * 501, "value is 1002 bytes, over Customer.io's 1000-byte limit"),
        ("plan", "€" * 334, "value is 1002 bytes, over Customer.io's 1000-byte limit"),
        ("tags", ["x" * 996], None),
        ("tags", ["x" * 997], "value is 1001 bytes, over Customer.io's 1000-byte limit"),
        ("address", {"k": "x" * 992}, None),
        ("address", {"k": "x" * 993}, "value is 1001 bytes, over Customer.io's 1000-byte limit"),
        ("n" * 150, 1, None),
        ("n" * 151, 1, "name is 151 bytes, over Customer.io's 150-byte limit"),
        ("ü" * 76, 1, "name is 152 bytes, over Customer.io's 150-byte limit"),
        ("score", 10**999, None),
        ("score", 10**1000, "value is 1001 bytes, over Customer.io's 1000-byte limit"),
        ("score", -(10**998), None),
        ("score", -(10**999), "value is 1001 bytes, over Customer.io's 1000-byte limit"),
        ("ratio", -1.5e-300, None),
        ("flag", False, None),
        ("flag", True, None),
        ("nothing", None, None),
        ("plan", "\ud800", f"value {mapping.NOT_UTF8}"),
        ("address", {"city": ["ok", "x\udfff"]}, f"value {mapping.NOT_UTF8}"),
        ("pl\ud800n", "pro", f"name {mapping.NOT_UTF8}"),
    ],
)
def test_attribute_error_applies_utf8_byte_limits(
    name: str, value: Any, expected: str | None
) -> None:
    assert mapping.attribute_error(name, value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", 3),
        ("é", 2),
        ("€", 3),
        (12, 2),
        (1.5, 3),
        (True, 4),
        (None, 4),
        ([1, 2], 5),
        ({"a": "é"}, 10),
        (False, 5),
        (-120, 4),
        (0.1, 3),
        (1e20, 5),
        (float("inf"), 8),
        (2**70, 22),
    ],
)
def test_byte_size_measures_utf8_and_compact_json(value: Any, expected: int) -> None:
    assert mapping.byte_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "plain", "é€", 0, -7, 2**63, True, False, None, 0.0, -0.0, 1.5e-7, 1e300, float("nan")],
)
def test_byte_size_of_a_scalar_is_its_json_text(value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    assert mapping.byte_size(value) == len(text.encode("utf-8"))


@pytest.mark.parametrize(
    ("customer_id", "expected"),
    [
        ("x" * 150, None),
        ("x" * 151, "customer id is 151 bytes, over Customer.io's 150-byte limit"),
        ("日" * 50, None),
        ("日" * 51, "customer id is 153 bytes, over Customer.io's 150-byte limit"),
        ("ext-\ud800", f"customer id {mapping.NOT_UTF8}"),
    ],
)
def test_customer_id_error_applies_150_byte_limit(customer_id: str, expected: str | None) -> None:
    assert mapping.customer_id_error(customer_id) == expected


@pytest.mark.parametrize(
    ("name", "data", "page", "expected"),
    [
        ("x" * 100, {}, False, None),
        ("x" * 101, {}, False, "event name is 101 bytes, over Customer.io's 100-byte limit"),
        ("é" * 51, {}, False, "event name is 102 bytes, over Customer.io's 100-byte limit"),
        ("https://example.com/" + "x" * 200, {}, True, None),
        (
            "Big",
            {"blob": "x" * 100_000},
            False,
            "event data is 100011 bytes, over Customer.io's 100000-byte limit",
        ),
        ("Signed \ud800", {}, False, f"event name {mapping.NOT_UTF8}"),
        ("https://example.com/\ud800", {}, True, f"event name {mapping.NOT_UTF8}"),
        ("Signed Up", {"plan": "\ud800"}, False, f"event data {mapping.NOT_UTF8}"),
    ],
)
def test_event_error_applies_event_limits(
    name: str, data: dict[str, Any], page: bool, expected: str | None
) -> None:
    assert mapping.event_error(name, data, page=page) == expected


@pytest.mark.parametrize(
    ("mapping_name", "overrides", "expected"),
    [
        ("external_id", {"attributes": {"external_id": "u-42"}}, "u-42"),
        ("external_id", {"attributes": {}, "external_id": "from-field"}, "from-field"),
        ("external_id", {"attributes": {"external_id": None}, "external_id": "f"}, "f"),
        ("email", {"attributes": {}, "email": "ana@example.com"}, "ana@example.com"),
        ("crm_id", {"attributes": {"crm_id": 42}}, "42"),
        ("crm_id", {"attributes": {"crm_id": "c-9"}}, "c-9"),
        ("traits_crm_id", {"attributes": {"crm_id": "c-9"}}, "c-9"),
        ("crm_id", {"attributes": {}, "external_id": "ext"}, None),
        ("crm_id", {"attributes": {"crm_id": "   "}}, None),
        ("crm_id", {"attributes": {"crm_id": ""}}, None),
        ("crm_id", {"attributes": {"crm_id": True}}, None),
        ("crm_id", {"attributes": {"crm_id": {"id": 1}}}, None),
        ("crm_id", {"attributes": {"crm_id": 4.2}}, None),
        ("external_id", {"attributes": {}, "external_id": None}, None),
        ("external_id", {"attributes": {}, "external_id": ""}, None),
    ],
)
def test_customer_id_reads_the_mapped_attribute(
    mapping_name: str, overrides: dict[str, Any], expected: str | None
) -> None:
    assert mapping.customer_id(make_user(**overrides), mapping_name) == expected


def test_build_attributes_sends_fixed_and_synchronized_attributes() -> None:
    user = make_user(
        anonymous_ids=("anon-1", "anon-7"),
        attributes={
            "created_at": "2018-03-30T14:38:02Z",
            "first_name": "Ana",
            "plan_started_at": "2018-03-30 14:38:02 UTC",
            "salesforce_lead/title": "CTO",
            "empty": None,
        },
        account={"clearbit/name": "Acme"},
        segments=({"id": "s2", "name": "Trials"}, {"id": "s1", "name": "Paying"}),
    )
    settings = ConnectorSettings(
        synchronized_attributes=(
            "first_name",
            "plan_started_at",
            "traits_salesforce_lead/title",
            "account.clearbit/name",
            "empty",
            "not_there",
            "account.not_there",
        )
    )

    attributes, errors = mapping.build_attributes(user, settings)

    assert attributes == {
        "email": "ana@example.com",
        "created_at": HULL_TIME,
        "hull_segments": ["Paying", "Trials"],
        "anonymous_id": "anon-7",
        "first_name": "Ana",
        "plan_started_at": HULL_TIME,
        "salesforce_lead-title": "CTO",
        "account_clearbit-name": "Acme",
        "empty": None,
    }
    assert errors == {}


def test_build_attributes_leaves_out_over_limit_attributes_with_reason() -> None:
    user = make_user(attributes={"bio": "é" * 600, "nick": "ok", "n" * 151: 1})
    settings = ConnectorSettings(synchronized_attributes=("bio", "nick", "n" * 151))

    attributes, errors = mapping.build_attributes(user, settings)

    assert "bio" not in attributes
    assert "n" * 151 not in attributes
    assert attributes["nick"] == "ok"
    assert errors == {
        "bio": "value is 1200 bytes, over Customer.io's 1000-byte limit",
        "n" * 151: "name is 151 bytes, over Customer.io's 150-byte limit",
    }


def test_build_attributes_omits_unknown_email_created_at_and_anonymous_id() -> None:
    user = make_user(email=None, attributes={"created_at": "garbage"})

    attributes, errors = mapping.build_attributes(user, ConnectorSettings())

    assert attributes == {"hull_segments": []}
    assert errors == {}


def test_build_attributes_keeps_more_than_300_attributes() -> None:
    names = [f"a{i}" for i in range(320)]
    user = make_user(attributes=dict.fromkeys(names, 1))

    attributes, _ = mapping.build_attributes(
        user, ConnectorSettings(synchronized_attributes=tuple(names))
    )

    assert len(attributes) == 322


@pytest.mark.parametrize(
    ("current", "sent", "expected"),
    [
        ({"a": 1, "b": 2}, {"a": 1, "b": 2}, {}),
        ({"a": 1, "b": 3}, {"a": 1, "b": 2}, {"b": 3}),
        ({"a": 1, "new": None}, {"a": 1}, {"new": None}),
        ({"a": 1}, {"a": 1, "gone": 2}, {}),
        ({"flag": True}, {"flag": 1}, {"flag": True}),
        ({"tags": ["a", "b"]}, {"tags": ["b", "a"]}, {"tags": ["a", "b"]}),
        ({"o": {"x": 1, "y": 2}}, {"o": {"y": 2, "x": 1}}, {}),
        ({"a": None}, {"a": "x"}, {"a": None}),
        ({"a": None}, {"a": None}, {}),
        ({"flag": False}, {"flag": 0}, {"flag": False}),
        ({"n": 1.0}, {"n": 1}, {"n": 1.0}),
        ({"n": 0.0}, {"n": -0.0}, {"n": 0.0}),
        ({"n": 2.5}, {"n": 2.5}, {}),
        ({"s": "é"}, {"s": "é"}, {}),
        ({"s": "1"}, {"s": 1}, {"s": "1"}),
    ],
)
def test_changed_attributes_keeps_new_and_different_values(
    current: dict[str, Any], sent: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert mapping.changed_attributes(current, sent) == expected


@pytest.mark.parametrize(
    ("count", "size", "expected_sizes"),
    [
        (45, 30, [30, 15]),
        (49, 30, [30, 19]),
        (315, 30, [30] * 10 + [15]),
        (319, 30, [30] * 10 + [19]),
        (30, 30, [30]),
        (5, 2, [2, 2, 1]),
        (300, 300, [300]),
    ],
)
def test_chunk_attributes_splits_with_email_and_created_at_first(
    count: int, size: int, expected_sizes: list[int]
) -> None:
    attributes = {f"a{i}": i for i in range(count - 2)}
    attributes["created_at"] = HULL_TIME
    attributes["email"] = "ana@example.com"

    chunks = mapping.chunk_attributes(attributes, size)

    assert [len(chunk) for chunk in chunks] == expected_sizes
    assert list(chunks[0])[:2] == ["email", "created_at"]
    rest = [name for chunk in chunks for name in chunk][2:]
    assert rest == [f"a{i}" for i in range(count - 2)]
    assert {k: v for chunk in chunks for k, v in chunk.items()} == attributes


def test_chunk_attributes_keeps_order_without_email() -> None:
    chunks = mapping.chunk_attributes({"b": 1, "a": 2, "c": 3}, 2)

    assert chunks == [{"b": 1, "a": 2}, {"c": 3}]


def test_chunk_attributes_empty_gives_no_chunks() -> None:
    assert mapping.chunk_attributes({}, 30) == []


def test_chunk_attributes_refuses_size_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        mapping.chunk_attributes({"a": 1}, 0)


@pytest.mark.parametrize(
    ("occurred_at", "expected_ms"),
    [
        (datetime(2018, 3, 30, 14, 38, 2, tzinfo=UTC), HULL_TIME * 1000),
        (datetime(2018, 3, 30, 14, 38, 2, 123000, tzinfo=UTC), HULL_TIME * 1000 + 123),
        (datetime(2018, 3, 30, 14, 38, 2), HULL_TIME * 1000),
        (datetime(2018, 3, 30, 16, 38, 2, tzinfo=timezone(timedelta(hours=2))), HULL_TIME * 1000),
        (None, 0),
        (datetime(1960, 1, 1, tzinfo=UTC), 0),
    ],
)
def test_event_ulid_time_part_is_event_time_in_ms(
    occurred_at: datetime | None, expected_ms: int
) -> None:
    value = mapping.event_ulid("ev-1", occurred_at)

    assert len(value) == 26
    assert ULID.from_str(value).milliseconds == expected_ms


def test_event_ulid_of_an_id_with_a_lone_surrogate_is_stable() -> None:
    first = mapping.event_ulid("ev-\ud800", None)
    assert first == mapping.event_ulid("ev-\ud800", None) and len(first) == 26


def test_event_ulid_random_part_is_sha256_of_event_id() -> None:
    value = ULID.from_str(mapping.event_ulid("ev-1", None))

    assert bytes(value)[6:] == hashlib.sha256(b"ev-1").digest()[:10]


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        (
            ("ev-1", datetime(2018, 3, 30, tzinfo=UTC)),
            ("ev-1", datetime(2018, 3, 30, tzinfo=UTC)),
            True,
        ),
        (("ev-1", None), ("ev-1", None), True),
        (
            ("ev-1", datetime(2018, 3, 30, tzinfo=UTC)),
            ("ev-2", datetime(2018, 3, 30, tzinfo=UTC)),
            False,
        ),
        (
            ("ev-1", datetime(2018, 3, 30, tzinfo=UTC)),
            ("ev-1", datetime(2018, 3, 31, tzinfo=UTC)),
            False,
        ),
    ],
)
def test_event_ulid_is_deterministic(
    first: tuple[str, datetime | None], second: tuple[str, datetime | None], same: bool
) -> None:
    assert (mapping.event_ulid(*first) == mapping.event_ulid(*second)) is same


@pytest.mark.parametrize(
    ("occurred_at", "expected"),
    [
        (datetime(2018, 3, 30, 14, 38, 2, 999999, tzinfo=UTC), HULL_TIME),
        (datetime(2018, 3, 30, 14, 38, 2), HULL_TIME),
        (None, None),
    ],
)
def test_event_timestamp_is_unix_seconds(
    occurred_at: datetime | None, expected: int | None
) -> None:
    assert mapping.event_timestamp(occurred_at) == expected


@pytest.mark.parametrize(
    ("properties", "context", "expected_name", "expected_data"),
    [
        (
            {"url": "https://a.example/p", "referrer": "https://g.example/", "title": "P"},
            {"page_url": "https://ctx.example/", "referrer_url": "https://ctx-ref.example/"},
            "https://a.example/p",
            {"url": "https://a.example/p", "referrer": "https://g.example/", "title": "P"},
        ),
        (
            {"title": "P"},
            {"page_url": "https://ctx.example/", "referrer_url": "https://ctx-ref.example/"},
            "https://ctx.example/",
            {"title": "P", "referrer": "https://ctx-ref.example/"},
        ),
        (
            {"url": "", "referrer": None},
            {"page_url": "https://ctx.example/"},
            "https://ctx.example/",
            {"url": "", "referrer": None},
        ),
        ({"url": "https://a.example/"}, {}, "https://a.example/", {"url": "https://a.example/"}),
        (
            {"title": "P"},
            {"referrer_url": "https://r.example/"},
            None,
            {"title": "P", "referrer": "https://r.example/"},
        ),
        ({}, {}, None, {}),
    ],
)
def test_page_view_uses_url_and_referrer_fallbacks(
    properties: dict[str, Any],
    context: dict[str, Any],
    expected_name: str | None,
    expected_data: dict[str, Any],
) -> None:
    assert mapping.page_view(make_event(properties, context)) == (expected_name, expected_data)


def test_page_view_does_not_change_the_event_properties() -> None:
    event = make_event({"title": "P"}, {"page_url": "https://a.example/", "referrer_url": "r"})

    mapping.page_view(event)

    assert event.properties == {"title": "P"}


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({"source": "customerio"}, True),
        ({"source": "CustomerIO"}, True),
        ({"source": "segment"}, False),
        ({}, False),
        ({"source": None}, False),
    ],
)
def test_is_from_customerio_reads_context_source(context: dict[str, Any], expected: bool) -> None:
    assert mapping.is_from_customerio(make_event(context=context)) is expected
