import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connector.notifications.parse import PlatformEvent
from connector.outbound import mapping
from connector.outbound.operations import (
    DeleteCustomer,
    Identify,
    PlanAction,
    Track,
    UserSnapshot,
)
from connector.outbound.planner import plan_user as plan_with_names
from connector.settings.model import ConnectorSettings

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hull_notification.json"
CREATED = datetime(2018, 3, 30, 14, 38, 2, tzinfo=UTC)
LATER = datetime(2018, 5, 1, tzinfo=UTC)
HULL_TIME = 1522420682


def make_event(
    event_id: str = "ev-1",
    name: str = "Signed Up",
    properties: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    occurred_at: datetime | None = CREATED,
) -> PlatformEvent:
    return PlatformEvent(
        event_id=event_id,
        name=name,
        properties={"plan": "pro"} if properties is None else properties,
        context=context or {},
        occurred_at=occurred_at,
    )


def make_user(**overrides: Any) -> UserSnapshot:
    values: dict[str, Any] = {
        "id": "u1",
        "external_id": "u-42",
        "email": "ana@example.com",
        "anonymous_ids": ("anon-1", "anon-7"),
        "attributes": {
            "external_id": "u-42",
            "email": "ana@example.com",
            "created_at": "2018-03-30T14:38:02Z",
            "first_name": "Ana",
        },
        "account": {},
        "segments": ({"id": "seg-paying", "name": "Paying customers"},),
    }
    values.update(overrides)
    return UserSnapshot(**values)


def make_settings(**overrides: Any) -> ConnectorSettings:
    values: dict[str, Any] = {
        "site_id": "site",
        "api_key": "key",
        "synchronized_segments": ("seg-paying",),
        "synchronized_attributes": ("first_name",),
        "events_filter": ("Signed Up", "page"),
    }
    values.update(overrides)
    return ConnectorSettings(**values)


WHITELISTED_NAMES = frozenset({"Paying customers"})
"""The names of the segments of ``make_settings``' ``synchronized_segments``."""
SENT_IN_SEGMENT = {"hull_segments": ["Paying customers"]}
SENT_OUTSIDE = {"hull_segments": ["Trial"]}


def plan_user(user: UserSnapshot, settings: ConnectorSettings) -> Any:
    return plan_with_names(user, settings, whitelisted_names=WHITELISTED_NAMES)


def user_from_fixture() -> UserSnapshot:
    """The sample notification's user, as the notification intake would store it."""
    notification = json.loads(FIXTURE.read_text())
    message = notification["messages"][0]
    user = message["user"]
    return make_user(
        id=user["id"],
        external_id=user["external_id"],
        email=user["email"],
        anonymous_ids=tuple(user["anonymous_ids"]),
        attributes={key.removeprefix("traits_"): value for key, value in user.items()},
        account=message["account"],
        segments=tuple(message["segments"]),
        events=tuple(
            make_event(
                event_id=event["event_id"],
                name=event["event"],
                properties=event["properties"],
                context=event["context"],
                occurred_at=datetime.strptime(event["created_at"], "%Y-%m-%d %H:%M:%S UTC").replace(
                    tzinfo=UTC
                ),
            )
            for event in message["events"]
        ),
    )


def full_attributes(user: UserSnapshot, settings: ConnectorSettings) -> dict[str, Any]:
    attributes, _ = mapping.build_attributes(user, settings)
    return attributes


def test_plan_user_insert_sends_full_identify_then_events() -> None:
    user = user_from_fixture()
    settings = make_settings(
        synchronized_attributes=(
            "first_name",
            "plan_started_at",
            "traits_salesforce_lead/title",
            "account.clearbit/name",
        )
    )

    plan = plan_user(user, settings)

    assert plan.action is PlanAction.SEND
    assert plan.customer_id == "u-42"
    identify, signed_up, page = plan.operations
    expected_attributes = {
        "email": "ana@example.com",
        "created_at": HULL_TIME,
        "hull_segments": ["Paying customers"],
        "anonymous_id": "anon-7",
        "first_name": "Ana",
        "plan_started_at": 1522540800,
        "salesforce_lead-title": "CTO",
        "account_clearbit-name": "Acme",
    }
    assert identify == Identify("u-42", expected_attributes)
    assert signed_up == Track(
        name="Signed Up",
        data={"plan": "pro"},
        timestamp=HULL_TIME,
        id=mapping.event_ulid("ev-1", CREATED),
        source_event_id="ev-1",
        customer_id="u-42",
    )
    assert page == Track(
        name="https://example.com/pricing",
        data={
            "url": "https://example.com/pricing",
            "referrer": "https://google.com/",
            "title": "Pricing",
        },
        timestamp=HULL_TIME + 58,
        id=mapping.event_ulid("ev-2", datetime(2018, 3, 30, 14, 39, tzinfo=UTC)),
        source_event_id="ev-2",
        customer_id="u-42",
        page=True,
    )
    assert plan.attributes == expected_attributes
    assert plan.attribute_errors == {}
    assert plan.skipped_events == {}


def test_plan_user_update_sends_only_changed_attributes() -> None:
    settings = make_settings(synchronized_attributes=("first_name", "plan"))
    before = make_user(attributes={**make_user().attributes, "plan": "free"})
    user = make_user(
        attributes={**make_user().attributes, "plan": "pro", "first_name": "Anabel"},
        sent_attributes=full_attributes(before, settings),
    )

    plan = plan_user(user, settings)

    assert plan.action is PlanAction.SEND
    assert plan.operations == (Identify("u-42", {"first_name": "Anabel", "plan": "pro"}),)
    assert plan.attributes == full_attributes(user, settings)


@pytest.mark.parametrize(
    "overrides",
    [
        {"full": True},
        {"cio_created_at": CREATED, "cio_deleted_at": LATER},
        {"sent_attributes": {}},
    ],
)
def test_plan_user_full_send_when_full_deleted_since_or_never_sent(
    overrides: dict[str, Any],
) -> None:
    settings = make_settings()
    sent = full_attributes(make_user(), settings)
    user = make_user(**{"sent_attributes": sent, **overrides})

    plan = plan_user(user, settings)

    assert plan.action is PlanAction.SEND
    assert plan.operations == (Identify("u-42", sent),)


def test_plan_user_no_changes_and_no_events_skips_without_calls() -> None:
    settings = make_settings()
    user = make_user(sent_attributes=full_attributes(make_user(), settings))

    plan = plan_user(user, settings)

    assert plan.action is PlanAction.SKIP
    assert plan.skip_reason == "no changes"
    assert plan.operations == ()
    assert plan.customer_id == "u-42"


def test_plan_user_unchanged_attributes_with_events_sends_only_events() -> None:
    settings = make_settings()
    user = make_user(sent_attributes=full_attributes(make_user(), settings), events=(make_event(),))

    plan = plan_user(user, settings)

    assert plan.action is PlanAction.SEND
    assert [type(op) for op in plan.operations] == [Track]
    assert plan.operations[0].name == "Signed Up"


def test_plan_user_not_in_segment_skips_user_and_events() -> None:
    user = make_user(
        segments=({"id": "seg-trial", "name": "Trials"},),
        events=(make_event("ev-1"), make_event("ev-2")),
    )

    plan = plan_user(user, make_settings())

    assert plan.action is PlanAction.SKIP
    assert plan.skip_reason == "not in any whitelisted segment"
    assert plan.operations == ()
    assert plan.skipped_events == {
        "ev-1": "not in any whitelisted segment",
        "ev-2": "not in any whitelisted segment",
    }


def test_plan_user_batch_bypasses_segment_whitelist() -> None:
    user = make_user(segments=(), via_batch=True, cio_created_at=CREATED)

    plan = plan_user(user, make_settings(enable_user_deletion=True))

    assert plan.action is PlanAction.SEND
    assert isinstance(plan.operations[0], Identify)
    assert plan.operations[0].attributes["hull_segments"] == []


@pytest.mark.parametrize(
    ("overrides", "expected_id"),
    [
        ({"cio_created_at": CREATED}, "u-42"),
        ({"cio_created_at": CREATED, "cio_id": "cio-1"}, "cio-1"),
        ({"cio_created_at": LATER, "cio_deleted_at": CREATED}, "u-42"),
        (
            {"cio_created_at": CREATED, "cio_id": "cio-1", "external_id": None, "attributes": {}},
            "cio-1",
        ),
    ],
)
def test_plan_user_deletes_customer_that_left_the_segments(
    overrides: dict[str, Any], expected_id: str
) -> None:
    user = make_user(
        segments=(), events=(make_event("ev-1"),), sent_attributes=SENT_IN_SEGMENT, **overrides
    )

    plan = plan_user(user, make_settings(enable_user_deletion=True))

    assert plan.action is PlanAction.DELETE
    assert plan.customer_id == expected_id
    assert plan.operations == (DeleteCustomer(expected_id),)
    assert plan.skipped_events == {"ev-1": "user deleted from Customer.io"}


def test_plan_user_already_deleted_is_skipped() -> None:
    user = make_user(
        segments=(), cio_created_at=CREATED, cio_deleted_at=LATER, events=(make_event(),)
    )

    plan = plan_user(user, make_settings(enable_user_deletion=True))

    assert plan.action is PlanAction.SKIP
    assert plan.skip_reason == "already deleted from Customer.io"
    assert plan.operations == ()
    assert plan.skipped_events == {"ev-1": "already deleted from Customer.io"}


@pytest.mark.parametrize(
    ("overrides", "deletion"),
    [
        ({"cio_created_at": CREATED}, False),
        ({"cio_created_at": None}, True),
    ],
)
def test_plan_user_not_deleted_when_off_or_never_created(
    overrides: dict[str, Any], deletion: bool
) -> None:
    plan = plan_user(
        make_user(segments=(), **overrides), make_settings(enable_user_deletion=deletion)
    )

    assert plan.action is PlanAction.SKIP
    assert plan.skip_reason == "not in any whitelisted segment"
    assert plan.operations == ()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # Sent while in a whitelisted segment (among others), in none now: it left.
        ({"cio_created_at": CREATED, "sent_attributes": SENT_IN_SEGMENT}, "delete"),
        (
            {
                "cio_created_at": CREATED,
                "sent_attributes": {"hull_segments": ["Trial", "Paying customers"]},
            },
            "delete",
        ),
        # Sent through /batch or import outside the whitelisted segments: never left.
        ({"cio_created_at": CREATED, "sent_attributes": SENT_OUTSIDE}, "skip"),
        ({"cio_created_at": CREATED, "sent_attributes": {"hull_segments": []}}, "skip"),
        # Created, but Customer.io never confirmed the segments: nothing says it was in one.
        ({"cio_created_at": CREATED, "sent_attributes": {}}, "skip"),
        # Hull's own connector created it and did not delete it: created, and left.
        ({"attributes": {"external_id": "u-42", "customerio/created_at": HULL_TIME}}, "delete"),
        (
            {
                "attributes": {
                    "external_id": "u-42",
                    "customerio/created_at": HULL_TIME,
                    "customerio/deleted_at": HULL_TIME + 60,
                }
            },
            "skip",
        ),
        # This connector deleted it since: Hull's trait does not bring it back.
        (
            {
                "attributes": {"external_id": "u-42", "customerio/created_at": HULL_TIME},
                "cio_deleted_at": LATER,
            },
            "skip",
        ),
        # This connector's own record wins over Hull's trait.
        (
            {
                "attributes": {"external_id": "u-42", "customerio/created_at": HULL_TIME},
                "cio_created_at": CREATED,
                "sent_attributes": SENT_OUTSIDE,
            },
            "skip",
        ),
        # Never created anywhere.
        ({"cio_created_at": None}, "skip"),
    ],
)
def test_plan_user_deletes_only_users_that_left_a_whitelisted_segment(
    overrides: dict[str, Any], expected: str
) -> None:
    user = make_user(segments=({"id": "seg-trial", "name": "Trial"},), **overrides)

    plan = plan_user(user, make_settings(enable_user_deletion=True))

    assert plan.action.value == expected
    if expected == "delete":
        assert plan.operations == (DeleteCustomer("u-42"),)
    else:
        assert plan.operations == ()


def test_plan_user_never_in_segments_says_why_it_is_not_deleted() -> None:
    user = make_user(segments=(), cio_created_at=CREATED, sent_attributes=SENT_OUTSIDE)

    plan = plan_user(user, make_settings(enable_user_deletion=True))

    assert plan.skip_reason == "not in any whitelisted segment (never was when sent: not deleted)"


def test_plan_user_left_segment_renamed_since_is_not_deleted() -> None:
    user = make_user(segments=(), cio_created_at=CREATED, sent_attributes=SENT_IN_SEGMENT)

    plan = plan_with_names(
        user, make_settings(enable_user_deletion=True), whitelisted_names={"Paying (renamed)"}
    )

    assert plan.action is PlanAction.SKIP


def test_plan_user_deletion_compares_naive_and_aware_times() -> None:
    user = make_user(segments=(), cio_created_at=datetime(2018, 3, 30), cio_deleted_at=LATER)

    plan = plan_user(user, make_settings(enable_user_deletion=True))

    assert plan.skip_reason == "already deleted from Customer.io"


def test_plan_user_sends_only_events_in_events_filter() -> None:
    user = make_user(
        events=(
            make_event("ev-1", "Signed Up"),
            make_event("ev-2", "Logged In"),
            make_event("ev-3", "page", {"url": "https://a.example/"}),
        )
    )

    plan = plan_user(user, make_settings(events_filter=("Signed Up",)))

    tracks = [op for op in plan.operations if isinstance(op, Track)]
    assert [track.source_event_id for track in tracks] == ["ev-1"]
    assert plan.skipped_events == {"ev-2": "not in events_filter", "ev-3": "not in events_filter"}


@pytest.mark.parametrize(
    ("properties", "context", "expected_name", "expected_data"),
    [
        (
            {"url": "https://a.example/", "referrer": "https://r.example/"},
            {},
            "https://a.example/",
            {"url": "https://a.example/", "referrer": "https://r.example/"},
        ),
        (
            {"title": "Home"},
            {"page_url": "https://ctx.example/", "referrer_url": "https://ctx-r.example/"},
            "https://ctx.example/",
            {"title": "Home", "referrer": "https://ctx-r.example/"},
        ),
    ],
)
def test_plan_user_sends_page_views(
    properties: dict[str, Any],
    context: dict[str, Any],
    expected_name: str,
    expected_data: dict[str, Any],
) -> None:
    user = make_user(events=(make_event("ev-9", "page", properties, context),))

    plan = plan_user(user, make_settings())

    page = plan.operations[-1]
    assert isinstance(page, Track)
    assert page.page is True
    assert page.name == expected_name
    assert page.data == expected_data
    assert page.customer_id == "u-42"


def test_plan_user_skips_page_view_without_url() -> None:
    user = make_user(events=(make_event("ev-9", "page", {"title": "Home"}),))

    plan = plan_user(user, make_settings())

    assert not any(isinstance(op, Track) for op in plan.operations)
    assert plan.skipped_events["ev-9"].startswith("page view without a url")


def test_plan_user_skips_event_with_name_over_100_bytes() -> None:
    name = "é" * 51
    user = make_user(events=(make_event("ev-1", name),))

    plan = plan_user(user, make_settings(events_filter=(name,)))

    assert not any(isinstance(op, Track) for op in plan.operations)
    assert plan.skipped_events == {
        "ev-1": "event name is 102 bytes, over Customer.io's 100-byte limit"
    }


def test_plan_user_never_sends_customerio_events_back() -> None:
    user = make_user(
        events=(
            make_event("ev-1", "Email Opened", context={"source": "customerio"}),
            make_event("ev-2", "Signed Up"),
        )
    )

    plan = plan_user(user, make_settings(events_filter=("Email Opened", "Signed Up")))

    tracks = [op for op in plan.operations if isinstance(op, Track)]
    assert [track.source_event_id for track in tracks] == ["ev-2"]
    assert plan.skipped_events == {"ev-1": "came from Customer.io"}


@pytest.mark.parametrize(
    "segments",
    [({"id": "seg-paying", "name": "Paying customers"},), ()],
)
def test_plan_user_sends_anonymous_events_without_customer_id(
    segments: tuple[dict[str, Any], ...],
) -> None:
    user = make_user(
        external_id=None,
        attributes={},
        segments=segments,
        events=(
            make_event("ev-1", "Signed Up"),
            make_event("ev-2", "page", {"url": "https://a.example/"}),
            make_event("ev-3", "Logged In"),
            make_event("ev-4", "Signed Up", context={"source": "customerio"}),
        ),
    )

    plan = plan_user(user, make_settings(anonymous_events=True))

    assert plan.action is PlanAction.ANONYMOUS
    assert plan.customer_id is None
    assert [
        (op.source_event_id, op.anonymous_id, op.customer_id, op.page) for op in plan.operations
    ] == [
        ("ev-1", "anon-7", None, False),
        ("ev-2", "anon-7", None, True),
    ]
    assert plan.skipped_events == {"ev-3": "not in events_filter", "ev-4": "came from Customer.io"}


def test_plan_user_anonymous_without_sendable_events_is_skipped() -> None:
    user = make_user(external_id=None, attributes={}, events=(make_event("ev-3", "Logged In"),))

    plan = plan_user(user, make_settings(anonymous_events=True))

    assert plan.action is PlanAction.SKIP
    assert plan.skip_reason == "no customer id: user has no 'external_id'"
    assert plan.skipped_events == {"ev-3": "not in events_filter"}


@pytest.mark.parametrize(
    ("anonymous_events", "anonymous_ids"),
    [(False, ("anon-7",)), (True, ())],
)
def test_plan_user_without_customer_id_is_skipped(
    anonymous_events: bool, anonymous_ids: tuple[str, ...]
) -> None:
    user = make_user(
        external_id=None, attributes={}, anonymous_ids=anonymous_ids, events=(make_event(),)
    )

    plan = plan_user(user, make_settings(anonymous_events=anonymous_events))

    assert plan.action is PlanAction.SKIP
    assert plan.skip_reason == "no customer id: user has no 'external_id'"
    assert plan.operations == ()
    assert plan.skipped_events == {"ev-1": "no customer id: user has no 'external_id'"}


def test_plan_user_uses_the_configured_user_id_mapping() -> None:
    user = make_user(attributes={**make_user().attributes, "crm_id": 1234})

    plan = plan_user(user, make_settings(user_id_mapping="crm_id"))

    assert plan.customer_id == "1234"
    assert plan.operations[0].customer_id == "1234"


def test_plan_user_skips_customer_id_over_150_bytes() -> None:
    user = make_user(external_id="ü" * 76, attributes={}, events=(make_event(),))

    plan = plan_user(user, make_settings())

    assert plan.action is PlanAction.SKIP
    assert plan.skip_reason == "customer id is 152 bytes, over Customer.io's 150-byte limit"
    assert plan.operations == ()
    assert set(plan.skipped_events) == {"ev-1"}


def test_plan_user_leaves_out_over_limit_attribute_and_sends_the_rest() -> None:
    user = make_user(attributes={**make_user().attributes, "bio": "x" * 1204})

    plan = plan_user(user, make_settings(synchronized_attributes=("first_name", "bio")))

    assert plan.action is PlanAction.SEND
    (identify,) = plan.operations
    assert "bio" not in identify.attributes
    assert identify.attributes["first_name"] == "Ana"
    assert plan.attribute_errors == {
        "bio": "value is 1204 bytes, over Customer.io's 1000-byte limit"
    }
    assert "bio" not in plan.attributes


@pytest.mark.parametrize(("extra", "calls"), [(41, 2), (311, 11)])
def test_plan_user_chunks_identify_with_email_and_created_at_first(extra: int, calls: int) -> None:
    names = [f"a{i}" for i in range(extra)]
    user = make_user(attributes={**make_user().attributes, **dict.fromkeys(names, "v")})

    plan = plan_user(user, make_settings(synchronized_attributes=tuple(names)))

    identifies = [op for op in plan.operations if isinstance(op, Identify)]
    assert len(identifies) == calls
    assert all(len(op.attributes) <= 30 for op in identifies)
    assert list(identifies[0].attributes)[:2] == ["email", "created_at"]
    assert all(op.customer_id == "u-42" for op in identifies)
    merged = {k: v for op in identifies for k, v in op.attributes.items()}
    assert merged == plan.attributes
    assert len(merged) == extra + 4


def test_plan_user_chunks_only_the_changed_attributes() -> None:
    names = [f"a{i}" for i in range(40)]
    settings = make_settings(synchronized_attributes=tuple(names))
    before = make_user(attributes={**make_user().attributes, **dict.fromkeys(names, "v")})
    after = make_user(
        attributes={**before.attributes, "a3": "w", "a39": "w"},
        sent_attributes=full_attributes(before, settings),
    )

    plan = plan_user(after, settings)

    assert plan.operations == (Identify("u-42", {"a3": "w", "a39": "w"}),)
